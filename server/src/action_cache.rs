//! The ActionCache gRPC service, over the [`ActionCache`] handle of
//! `kiln-storage` (which applies the completeness rule below).
//!
//! The completeness rule: a result is returned only if every blob it
//! references is still in the CAS; otherwise the lookup is a miss (NOT_FOUND),
//! so the client rebuilds instead of failing on a missing output. Results
//! with a non-zero exit code are never cached, and a result that references
//! blobs the CAS lacks is refused, so a cache entry can never point at
//! nothing from the start.

use kiln_proto::reapi::action_cache_server::ActionCache as ActionCacheRpc;
use kiln_proto::reapi::{ActionResult, GetActionResultRequest, UpdateActionResultRequest};

use tonic::{Request, Response, Status};

use crate::digest::{Digest, check_digest_function};
use crate::error::{Error, Result};
use crate::instances::Instances;
use kiln_storage::ActionCache;

/// Most bytes of stdout, stderr and output files inlined into one
/// GetActionResult response (clients' default message limit is 4 MiB).
const INLINE_BUDGET: u64 = 1 << 20;

/// The ActionCache gRPC service.
#[derive(Clone, Debug)]
pub struct ActionCacheService {
    cache: ActionCache,
    instances: Instances,
}

impl ActionCacheService {
    /// A service over `cache`, answering for `instances`.
    pub fn new(cache: ActionCache, instances: Instances) -> Self {
        ActionCacheService { cache, instances }
    }

    async fn get(&self, req: GetActionResultRequest) -> Result<ActionResult> {
        self.instances.check(&req.instance_name)?;
        check_digest_function(req.digest_function)?;
        let action = Digest::from_field(req.action_digest.as_ref(), "action_digest")?;
        let found = self.cache.get(&req.instance_name, &action).await?;
        crate::metrics::global().cache_lookup("get_action_result", found.is_some());
        let mut result = found
            .ok_or_else(|| Error::NotFound(format!("no cached result for action {action}")))?;
        self.inline(&mut result, &req).await?;
        Ok(result)
    }

    /// Fills `stdout_raw`, `stderr_raw` and output file contents the client
    /// asked for, as far as the inline budget allows.
    async fn inline(&self, result: &mut ActionResult, req: &GetActionResultRequest) -> Result<()> {
        let mut budget = INLINE_BUDGET;
        let mut take = |d: Option<&kiln_proto::reapi::Digest>| -> Option<Digest> {
            let d = Digest::from_proto(d?).ok()?;
            if d.size() == 0 || d.size() > budget {
                return None;
            }
            budget -= d.size();
            Some(d)
        };
        let mut wanted: Vec<(usize, Digest)> = Vec::new();
        const STDOUT: usize = usize::MAX;
        const STDERR: usize = usize::MAX - 1;
        if req.inline_stdout
            && result.stdout_raw.is_empty()
            && let Some(d) = take(result.stdout_digest.as_ref())
        {
            wanted.push((STDOUT, d));
        }
        if req.inline_stderr
            && result.stderr_raw.is_empty()
            && let Some(d) = take(result.stderr_digest.as_ref())
        {
            wanted.push((STDERR, d));
        }
        for (i, f) in result.output_files.iter().enumerate() {
            if req.inline_output_files.contains(&f.path)
                && let Some(d) = take(f.digest.as_ref())
            {
                wanted.push((i, d));
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let digests: Vec<Digest> = wanted.iter().map(|(_, d)| *d).collect();
        let blobs = self.cache.cas().get_many(&digests).await;
        for ((slot, _), blob) in wanted.into_iter().zip(blobs) {
            // A blob evicted since the completeness check simply stays
            // un-inlined; the client reads it by digest (and gets NOT_FOUND).
            let Some(data) = blob? else { continue };
            let data = Vec::from(data);
            match slot {
                STDOUT => result.stdout_raw = data,
                STDERR => result.stderr_raw = data,
                i => result.output_files[i].contents = data,
            }
        }
        Ok(())
    }

    async fn update(&self, req: UpdateActionResultRequest) -> Result<ActionResult> {
        self.instances.check(&req.instance_name)?;
        check_digest_function(req.digest_function)?;
        let action = Digest::from_field(req.action_digest.as_ref(), "action_digest")?;
        let result = req
            .action_result
            .ok_or_else(|| Error::MissingField("action_result".into()))?;
        self.cache.put(&req.instance_name, &action, &result).await?;
        Ok(result)
    }
}

#[tonic::async_trait]
impl ActionCacheRpc for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> std::result::Result<Response<ActionResult>, Status> {
        Ok(Response::new(self.get(request.into_inner()).await?))
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> std::result::Result<Response<ActionResult>, Status> {
        Ok(Response::new(self.update(request.into_inner()).await?))
    }
}
