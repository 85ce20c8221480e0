//! The supervisor's view of the environment, written to `status.json` after every change and
//! read by `rigger up` (to know when it is done) and `rigger status`. Its JSON form is the
//! documented `rigger.status` schema shared with the AWS provider (docs/status-json.md).

use serde::{Deserialize, Serialize};

use crate::registry::write_atomically;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Bringing the environment up.
    Starting,
    /// Every server is running and every web server is UP behind the load balancer.
    Ready,
    /// Ready before, now replacing or restarting something.
    Healing,
    /// Bring-up failed; `message` says why. The supervisor has stopped everything.
    Failed,
    /// Rolling out a release (or rolling one back).
    Deploying,
    Stopping,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStatus {
    pub name: String,
    pub pid: Option<i32>,
    /// `running`, `stopped`.
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStatus {
    pub id: String,
    pub roles: Vec<String>,
    pub address: String,
    pub release: String,
    /// `pending`, `in_service`, `unhealthy`.
    pub state: String,
    pub processes: Vec<ProcessStatus>,
    /// Web servers only: `UP`, `DOWN`, ... as the load balancer reports it.
    pub load_balancer: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub id: String,
    /// `streaming`, or what PostgreSQL reports.
    pub state: String,
    pub lag_bytes: Option<i64>,
    pub lag_seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub name: String,
    pub min: u32,
    pub desired: u32,
    pub max: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub schema: String,
    pub version: u32,
    pub project: String,
    pub environment: String,
    pub provider: String,
    pub phase: Phase,
    pub message: String,
    pub release: String,
    pub urls: Vec<String>,
    pub supervisor_pid: Option<i32>,
    pub groups: Vec<GroupStatus>,
    pub servers: Vec<ServerStatus>,
    pub replication: Vec<ReplicaStatus>,
    /// Unix seconds of this snapshot.
    pub updated: u64,
}

impl Status {
    pub fn load(path: &std::path::Path) -> Option<Status> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        write_atomically(
            path,
            &serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
