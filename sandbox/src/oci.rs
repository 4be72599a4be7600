//! The OCI backend (in progress).

use std::os::fd::OwnedFd;

use crate::error::SetupError;
use crate::helper::{Action, HelperCtx};
use crate::protocol::WireRequest;

pub(crate) fn start_in_helper(
    _ctx: HelperCtx,
    _req: WireRequest,
    _sock: &OwnedFd,
    _stdout: OwnedFd,
    _stderr: OwnedFd,
) -> Result<Action, SetupError> {
    Err(SetupError {
        step: "the OCI backend is not implemented yet".into(),
        errno: 0,
    })
}
