//! The `rigger.status` document (`rigger status --json`), shared by every provider and
//! documented in docs/status-json.md. Plain data: providers fill it, the CLI prints it.

use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = "rigger.status";
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Bringing the environment up (or, on AWS: some server is not running yet).
    Starting,
    /// Every server is running and every web server is UP behind the load balancer.
    Ready,
    /// Ready before, now replacing or restarting something.
    Healing,
    /// Bring-up failed; `message` says why.
    Failed,
    /// Rolling out a release (or rolling one back).
    Deploying,
    Stopping,
    /// Nothing of the environment runs.
    Down,
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
    /// Unique for the environment's lifetime (local: `web-3`; AWS: `web[1]`, `cache`, ...).
    pub id: String,
    pub roles: Vec<String>,
    pub address: String,
    pub release: String,
    /// `pending`, `in_service`, `unhealthy`, or EC2's state (`stopped`, ...).
    pub state: String,
    /// Each service process, where the provider can see them (empty on AWS).
    pub processes: Vec<ProcessStatus>,
    /// Web servers only: the load balancer's view (`UP`, `DOWN`, `InService`, ...).
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

/// The keeper's account of supervisor deaths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorRestarts {
    pub count: u32,
    /// Why it last died ("killed by SIGKILL", "panicked").
    pub last_why: Option<String>,
    /// When (Unix seconds).
    pub last_at: Option<u64>,
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
    /// Local provider: the process that owns every service.
    pub supervisor_pid: Option<i32>,
    /// Local provider: how many times the supervisor died and its keeper started it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor_restarts: Option<SupervisorRestarts>,
    /// Whether maintenance mode is on (`rigger maintenance on`): web servers answer 503.
    #[serde(default)]
    pub maintenance: bool,
    pub groups: Vec<GroupStatus>,
    pub servers: Vec<ServerStatus>,
    pub replication: Vec<ReplicaStatus>,
    /// Unix seconds of this snapshot.
    pub updated: u64,
}
