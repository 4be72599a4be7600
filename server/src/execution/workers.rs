//! The worker-protocol service: workers join over one stream, receive
//! leases and report progress and results.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use kiln_proto::worker::workers_server::Workers;
use kiln_proto::worker::{ServerMessage, WorkerMessage, worker_message};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::state::ExecutionState;

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct WorkersService {
    state: Arc<ExecutionState>,
}

impl WorkersService {
    pub(super) fn new(state: Arc<ExecutionState>) -> Self {
        Self { state }
    }
}

type JoinStream = Pin<Box<dyn Stream<Item = Result<ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Workers for WorkersService {
    type JoinStream = JoinStream;

    async fn join(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::JoinStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10 s of joining"))??;
        let hello = match first.and_then(|m| m.kind) {
            Some(worker_message::Kind::Hello(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of Join must be Hello",
                ));
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = self.state.worker_joined(&hello, tx)?;
        let state = Arc::clone(&self.state);
        let worker = hello.worker_id.clone();
        tokio::spawn(async move {
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(m)) => {
                        state.worker_heard(&worker);
                        match m.kind {
                            Some(worker_message::Kind::Progress(p)) => {
                                state.worker_progress(&worker, &p)
                            }
                            Some(worker_message::Kind::Done(d)) => {
                                let state = Arc::clone(&state);
                                let worker = worker.clone();
                                tokio::spawn(async move { state.worker_done(&worker, d).await });
                            }
                            Some(worker_message::Kind::Ping(_)) | None => {}
                            Some(worker_message::Kind::Hello(_)) => {
                                tracing::warn!(worker = %worker, "ignoring a second Hello on the same stream");
                            }
                        }
                    }
                    Ok(None) => break "stream closed".to_string(),
                    Err(e) => break format!("stream failed: {e}"),
                }
            };
            state.worker_left(&worker, conn, &reason);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }
}
