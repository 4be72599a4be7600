//! The REAPI Execution service and google.longrunning Operations service.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use kiln_proto::longrunning::operations_server::Operations;
use kiln_proto::longrunning::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
    ListOperationsResponse, Operation, WaitOperationRequest,
};
use kiln_proto::protobuf::Empty;
use kiln_proto::reapi::execution_server::Execution;
use kiln_proto::reapi::{ExecuteRequest, RequestMetadata, WaitExecutionRequest};
use tonic::{Request, Response, Status};

use crate::instances::Instances;
use kiln_storage::Cas;

use super::state::{ClientInfo, ExecutionState, OpWatch};
use super::validate::{self, ValidTrees};

/// Long executions re-send their current state this often, so idle-stream
/// timeouts of proxies and clients never cut a healthy wait.
const RESEND: Duration = Duration::from_secs(30);

pub type OperationStream = Pin<Box<dyn Stream<Item = Result<Operation, Status>> + Send>>;

pub struct ExecutionService {
    state: Arc<ExecutionState>,
    cas: Cas,
    instances: Instances,
    valid: Arc<ValidTrees>,
}

impl ExecutionService {
    pub(super) fn new(
        state: Arc<ExecutionState>,
        cas: Cas,
        instances: Instances,
        valid: Arc<ValidTrees>,
    ) -> Self {
        Self {
            state,
            cas,
            instances,
            valid,
        }
    }

    /// Checks an Execute request and queues it (or answers it from the
    /// action cache).
    async fn accept(
        &self,
        req: &ExecuteRequest,
        client: ClientInfo,
    ) -> crate::error::Result<OpWatch> {
        self.instances.check(&req.instance_name)?;
        let checked = validate::check(&self.cas, &self.valid, &self.state.config, req).await?;
        let priority = req.execution_policy.as_ref().map_or(0, |p| p.priority);
        let (_, rx) = self
            .state
            .submit(checked, req.skip_cache_lookup, priority, client)
            .await?;
        Ok(rx)
    }
}

/// The `RequestMetadata` a client attached, if any.
pub fn request_metadata<T>(req: &Request<T>) -> Option<RequestMetadata> {
    crate::metrics::request_metadata_of(req.metadata().as_ref())
}

/// Streams an operation's states until it is done.
fn stream(rx: OpWatch) -> OperationStream {
    Box::pin(futures::stream::unfold(
        (rx, false, true),
        |(mut rx, finished, first)| async move {
            if finished {
                return None;
            }
            if !first {
                match tokio::time::timeout(RESEND, rx.changed()).await {
                    Ok(Ok(())) | Err(_) => {}
                    // The operation was deleted.
                    Ok(Err(_)) => return None,
                }
            }
            let op = rx.borrow_and_update().clone();
            let done = op.done;
            Some((Ok((*op).clone()), (rx, done, false)))
        },
    ))
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OperationStream;
    type WaitExecutionStream = OperationStream;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let client = request_metadata(&request)
            .map(|m| ClientInfo {
                tool: crate::metrics::tool_label(&m),
                invocation: m.tool_invocation_id,
            })
            .unwrap_or_default();
        let req = request.into_inner();
        match self.accept(&req, client).await {
            Ok(rx) => Ok(Response::new(stream(rx))),
            Err(e) => {
                // A refused Execute fails a build: operators see it at the
                // default level (the rpc span adds the client's tool and
                // invocation id), not only as a metrics counter.
                let status = e.into_status();
                let action = req
                    .action_digest
                    .as_ref()
                    .map_or("(none)".to_string(), |d| {
                        format!("{}/{}", d.hash, d.size_bytes)
                    });
                tracing::warn!(
                    action = %action,
                    instance = %req.instance_name,
                    code = ?status.code(),
                    reason = %status.message(),
                    "Execute refused"
                );
                Err(status)
            }
        }
    }

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<Self::WaitExecutionStream>, Status> {
        let name = request.into_inner().name;
        let rx = self
            .state
            .subscribe(&name)
            .ok_or_else(|| Status::not_found(format!("operation {name} not found")))?;
        Ok(Response::new(stream(rx)))
    }
}

pub struct OperationsService {
    state: Arc<ExecutionState>,
}

impl OperationsService {
    pub(super) fn new(state: Arc<ExecutionState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        let req = request.into_inner();
        let filter = parse_filter(&req.filter)?;
        let start: usize = if req.page_token.is_empty() {
            0
        } else {
            req.page_token.parse().map_err(|_| {
                Status::invalid_argument(format!("invalid page_token {:?}", req.page_token))
            })?
        };
        let page_size = if req.page_size <= 0 {
            1000
        } else {
            req.page_size as usize
        };
        let ops: Vec<Operation> = self
            .state
            .list()
            .into_iter()
            .filter(|op| filter.is_none_or(|done| op.done == done))
            .map(|op| (*op).clone())
            .collect();
        let end = (start + page_size).min(ops.len());
        let next_page_token = if end < ops.len() {
            end.to_string()
        } else {
            String::new()
        };
        Ok(Response::new(ListOperationsResponse {
            operations: ops.get(start..end).map(<[_]>::to_vec).unwrap_or_default(),
            next_page_token,
            unreachable: Vec::new(),
        }))
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let name = request.into_inner().name;
        self.state
            .get(&name)
            .map(|op| Response::new((*op).clone()))
            .ok_or_else(|| Status::not_found(format!("operation {name} not found")))
    }

    async fn delete_operation(
        &self,
        request: Request<DeleteOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.state.delete(&request.into_inner().name)?;
        Ok(Response::new(Empty {}))
    }

    async fn cancel_operation(
        &self,
        request: Request<CancelOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.state.cancel(&request.into_inner().name)?;
        Ok(Response::new(Empty {}))
    }

    async fn wait_operation(
        &self,
        request: Request<WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let req = request.into_inner();
        let mut rx = self
            .state
            .subscribe(&req.name)
            .ok_or_else(|| Status::not_found(format!("operation {} not found", req.name)))?;
        let limit = req
            .timeout
            .map(|t| {
                Duration::from_secs(t.seconds.max(0) as u64)
                    + Duration::from_nanos(t.nanos.max(0) as u64)
            })
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(60));
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let op = rx.borrow_and_update().clone();
            if op.done {
                return Ok(Response::new((*op).clone()));
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Ok(Response::new((*op).clone())),
            }
        }
    }
}

/// `done=true` / `done=false`, or nothing.
fn parse_filter(filter: &str) -> Result<Option<bool>, Status> {
    match filter.replace(' ', "").as_str() {
        "" => Ok(None),
        "done=true" => Ok(Some(true)),
        "done=false" => Ok(Some(false)),
        other => Err(Status::invalid_argument(format!(
            "unsupported filter {other:?}; Kiln understands \"done=true\" and \"done=false\""
        ))),
    }
}
