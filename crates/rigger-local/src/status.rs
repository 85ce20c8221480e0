//! The supervisor's view of the environment, written to `status.json` after every change and
//! read by `rigger up` (to know when it is done) and `rigger status`. Its JSON form is the
//! documented `rigger.status` schema shared with the AWS provider (docs/status-json.md).

use std::path::Path;

use crate::registry::write_atomically;
pub use rigger_plan::status::{
    GroupStatus, Phase, ProcessStatus, ReplicaStatus, ServerStatus, Status,
};

/// The supervisor's last status.json, if any.
pub fn load(path: &Path) -> Option<Status> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Writes status.json atomically.
pub fn save(status: &Status, path: &Path) -> std::io::Result<()> {
    write_atomically(
        path,
        &serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?,
    )
}
