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
use crate::registry::{read_state, write_atomically};

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

/// The deploy request the CLI wrote; `None` when there is none. A damaged one is an error
/// naming it.
pub fn read_request(paths: &EnvPaths) -> std::io::Result<Option<DeployRequest>> {
    read_state(
        &request_path(paths),
        "the request `rigger deploy` hands the supervisor: run `rigger deploy` again (it \
         writes a new one)",
    )
}

pub fn write_outcome(paths: &EnvPaths, outcome: &DeployOutcome) -> anyhow::Result<()> {
    std::fs::create_dir_all(paths.root().join("deploy"))?;
    write_atomically(&outcome_path(paths), &serde_json::to_vec_pretty(outcome)?)?;
    Ok(())
}

/// How the supervisor says the last deploy ended; `None` before the first. A damaged one is
/// an error naming it.
pub fn read_outcome(paths: &EnvPaths) -> std::io::Result<Option<DeployOutcome>> {
    read_state(
        &outcome_path(paths),
        "the supervisor's answer to the last deploy: `rigger releases` says how that deploy \
         ended; remove the file",
    )
}

/// A request the supervisor began (a deploy, a database operation): the request's id and
/// when (Unix seconds). With no outcome of that id, its supervisor died during it (a SIGTERM
/// records the outcome itself), and the next one records it `interrupted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Begun {
    pub request: String,
    pub started: u64,
}

impl Begun {
    /// Records, at `path` (`deploy/begun.json`, `db/begun.json`), that the request began now.
    pub fn record(path: &std::path::Path, request: &str, started: u64) {
        let begun = Begun {
            request: request.to_owned(),
            started,
        };
        let written = crate::files::create_private_dir(path.parent().unwrap_or(path))
            .map_err(anyhow::Error::from)
            .and_then(|()| Ok(serde_json::to_vec_pretty(&begun)?))
            .and_then(|bytes| Ok(write_atomically(path, &bytes)?));
        if let Err(error) = written {
            tracing::error!(
                "recording that request {request} began in {}: {error:#}",
                path.display()
            );
        }
    }
}

impl Begun {
    /// When request `id` began, if `begun` (the begun file's content) says it did and
    /// `last_answered` (the last request with an outcome) is another: a request a dead
    /// supervisor left unfinished. A damaged begun file is logged and counts as answered:
    /// whether it ended is unknown, and nothing is recorded twice.
    pub fn unanswered(
        begun: std::io::Result<Option<Begun>>,
        id: &str,
        last_answered: Option<&str>,
    ) -> Option<u64> {
        let begun = begun
            .map_err(|error| tracing::error!("{error}"))
            .ok()
            .flatten()?;
        (begun.request == id && last_answered != Some(id)).then_some(begun.started)
    }
}

pub fn begun_path(paths: &EnvPaths) -> PathBuf {
    paths.root().join("deploy/begun.json")
}

pub fn read_begun(paths: &EnvPaths) -> std::io::Result<Option<Begun>> {
    read_state(
        &begun_path(paths),
        "the supervisor's record that a deploy began: `rigger releases` says how it ended; \
         remove the file",
    )
}

mod lock;

pub use lock::{
    DeployLock, LOCK_RENEWAL, LOCK_TTL, LockHolder, live_lock_holder, lock_holder, release,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_request_outcome_or_begun_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let paths = EnvPaths::for_root_for_tests(dir.path());
        assert!(read_request(&paths).unwrap().is_none());
        assert!(read_outcome(&paths).unwrap().is_none());
        assert!(read_begun(&paths).unwrap().is_none());
        std::fs::create_dir_all(paths.root().join("deploy")).unwrap();
        type Read = fn(&EnvPaths) -> std::io::Result<()>;
        let files: [(PathBuf, &str, Read); 3] = [
            (request_path(&paths), "run `rigger deploy` again", |p| {
                read_request(p).map(drop)
            }),
            (outcome_path(&paths), "`rigger releases` says", |p| {
                read_outcome(p).map(drop)
            }),
            (begun_path(&paths), "remove the file", |p| {
                read_begun(p).map(drop)
            }),
        ];
        for (path, what_to_do, read) in files {
            // Cut off, as by a write that was not atomic.
            std::fs::write(&path, "{\"request\": \"12").unwrap();
            let error = read(&paths).unwrap_err().to_string();
            assert!(
                error.starts_with(&format!("{} is damaged (", path.display())),
                "{error}"
            );
            assert!(error.contains(what_to_do), "{error}");
        }
    }
}
