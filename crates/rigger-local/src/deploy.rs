//! Deploys on the local provider: the request the CLI hands the supervisor, the outcome it
//! hands back, and the deploy lock ([`lock`]: taken and released by compare-and-swap,
//! renewed while held).
//!
//! The supervisor owns the processes, so it performs the rollout (see
//! `Supervisor::deploy`); the CLI builds the release, holds the lock, writes
//! `deploy/request.json`, signals the supervisor (SIGUSR1) and waits for
//! `deploy/outcome.json` with the same request id.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::paths::EnvPaths;
use crate::registry::write_atomically;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRequest {
    /// Unique per request; the outcome carries it back.
    pub id: String,
    pub release: String,
    /// `1`, `2`, `50%`: servers replaced at a time.
    pub batch: String,
    /// How long new servers may take to be healthy before the deploy rolls back.
    pub health_timeout_secs: u64,
    /// How long an old worker may take to finish its running tasks (warm shutdown).
    pub worker_stop_timeout_secs: u64,
    /// How long an old web server may take to finish its requests after it stops getting new
    /// ones.
    #[serde(default = "default_drain_timeout_secs")]
    pub drain_timeout_secs: u64,
    pub requested_by: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployOutcome {
    pub request: String,
    pub release: String,
    /// `succeeded`, `rolled back`, `failed`, `interrupted` (the supervisor was stopped).
    pub result: String,
    /// Why it rolled back or failed, in words, with the evidence (load balancer's reason,
    /// health probe's answer, the app's last log lines).
    pub reason: String,
    pub duration_secs: f64,
}

fn default_drain_timeout_secs() -> u64 {
    rigger_engine::rollout::DEFAULT_DRAIN_TIMEOUT.as_secs()
}

pub fn request_path(paths: &EnvPaths) -> PathBuf {
    paths.root().join("deploy/request.json")
}

pub fn outcome_path(paths: &EnvPaths) -> PathBuf {
    paths.root().join("deploy/outcome.json")
}

pub fn write_request(paths: &EnvPaths, request: &DeployRequest) -> anyhow::Result<()> {
    std::fs::create_dir_all(paths.root().join("deploy"))?;
    write_atomically(&request_path(paths), &serde_json::to_vec_pretty(request)?)?;
    Ok(())
}

pub fn read_request(paths: &EnvPaths) -> Option<DeployRequest> {
    serde_json::from_slice(&std::fs::read(request_path(paths)).ok()?).ok()
}

pub fn write_outcome(paths: &EnvPaths, outcome: &DeployOutcome) -> anyhow::Result<()> {
    std::fs::create_dir_all(paths.root().join("deploy"))?;
    write_atomically(&outcome_path(paths), &serde_json::to_vec_pretty(outcome)?)?;
    Ok(())
}

pub fn read_outcome(paths: &EnvPaths) -> Option<DeployOutcome> {
    serde_json::from_slice(&std::fs::read(outcome_path(paths)).ok()?).ok()
}

/// A deploy the supervisor began: the request's id and when (Unix seconds). With no outcome
/// of that id, its supervisor died during it (a SIGTERM records the outcome itself), and the
/// next one records it `interrupted` before rolling back what it left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployBegun {
    pub request: String,
    pub started: u64,
}

pub fn write_begun(paths: &EnvPaths, begun: &DeployBegun) -> anyhow::Result<()> {
    std::fs::create_dir_all(paths.root().join("deploy"))?;
    write_atomically(
        &paths.root().join("deploy/begun.json"),
        &serde_json::to_vec_pretty(begun)?,
    )?;
    Ok(())
}

pub fn read_begun(paths: &EnvPaths) -> Option<DeployBegun> {
    serde_json::from_slice(&std::fs::read(paths.root().join("deploy/begun.json")).ok()?).ok()
}

mod lock;

pub use lock::{
    DeployLock, LOCK_RENEWAL, LOCK_TTL, LockHolder, live_lock_holder, lock_holder, release,
};
