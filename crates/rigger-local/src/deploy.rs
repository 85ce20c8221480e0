//! Deploys on the local provider: the request the CLI hands the supervisor, the outcome it
//! hands back, and the deploy lock.
//!
//! The supervisor owns the processes, so it performs the rollout (see
//! `Supervisor::deploy`); the CLI builds the release, holds the lock, writes
//! `deploy/request.json`, signals the supervisor (SIGUSR1) and waits for
//! `deploy/outcome.json` with the same request id.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
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
    /// `succeeded`, `rolled back`, `failed`.
    pub result: String,
    /// Why it rolled back or failed, in words, with the evidence (load balancer's reason,
    /// health probe's answer, the app's last log lines).
    pub reason: String,
    pub duration_secs: f64,
}

fn default_drain_timeout_secs() -> u64 {
    rigger_plan::rollout::DEFAULT_DRAIN_TIMEOUT.as_secs()
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

pub use rigger_plan::deploys::{LOCK_TTL, LockHolder};

fn lock_path(paths: &EnvPaths) -> PathBuf {
    paths.root().join("deploy.lock")
}

pub fn lock_holder(paths: &EnvPaths) -> Option<LockHolder> {
    serde_json::from_slice(&std::fs::read(lock_path(paths)).ok()?).ok()
}

/// Is the holder gone (its process ended on this machine) or past its expiry?
fn is_stale(holder: &LockHolder, now: u64) -> bool {
    holder.is_stale(now, &crate::release::host(), crate::release::process_exists)
}

/// The deploy lock, held while this value lives; released on drop.
#[derive(Debug)]
pub struct DeployLock {
    path: PathBuf,
    holder: LockHolder,
}

impl DeployLock {
    /// Takes the lock for `operation`, replacing a stale one; refuses, naming the holder, when
    /// someone else holds it.
    pub fn acquire(paths: &EnvPaths, operation: &str, now: u64) -> anyhow::Result<DeployLock> {
        std::fs::create_dir_all(paths.root())?;
        let path = lock_path(paths);
        let holder = LockHolder::new(
            &crate::release::who(),
            i32::try_from(std::process::id()).unwrap_or(0),
            operation,
            now,
        );
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&path)
            {
                Ok(mut file) => {
                    file.write_all(&serde_json::to_vec_pretty(&holder)?)?;
                    return Ok(DeployLock { path, holder });
                }
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                    match lock_holder(paths) {
                        Some(current) if !is_stale(&current, now) => bail!(
                            "another deploy holds the lock: {current}. Wait for it, or if it is \
                             really gone: `rigger lock release`"
                        ),
                        Some(stale) => tracing::warn!("taking over a stale deploy lock: {stale}"),
                        None => tracing::warn!("replacing an unreadable deploy lock"),
                    }
                    std::fs::remove_file(&path)
                        .with_context(|| format!("removing the stale lock {}", path.display()))?;
                }
                Err(error) => {
                    return Err(error).with_context(|| format!("creating {}", path.display()));
                }
            }
        }
        bail!("could not take the deploy lock {}", path.display())
    }

    /// Pushes the expiry forward (a long deploy is still alive).
    pub fn renew(&mut self, now: u64) -> anyhow::Result<()> {
        self.holder.expires = now + LOCK_TTL.as_secs();
        write_atomically(&self.path, &serde_json::to_vec_pretty(&self.holder)?)?;
        Ok(())
    }
}

impl Drop for DeployLock {
    fn drop(&mut self) {
        // Only our own lock: a lock someone forcibly took over is theirs now.
        if std::fs::read(&self.path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<LockHolder>(&bytes).ok())
            .is_some_and(|current| current == self.holder)
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Removes the lock whoever holds it; returns who did.
pub fn force_release(paths: &EnvPaths) -> anyhow::Result<Option<LockHolder>> {
    let holder = lock_holder(paths);
    match std::fs::remove_file(lock_path(paths)) {
        Ok(()) => Ok(holder),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_deploy_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let paths = EnvPaths::for_root_for_tests(dir.path());
        let first = DeployLock::acquire(&paths, "deploy r1", 1_000).unwrap();
        let error = DeployLock::acquire(&paths, "deploy r2", 1_001)
            .unwrap_err()
            .to_string();
        assert!(error.contains("another deploy holds the lock"), "{error}");
        assert!(error.contains("deploy r1"), "{error}");
        assert!(
            error.contains(&format!("pid {}", std::process::id())),
            "{error}"
        );
        drop(first);
        assert!(lock_holder(&paths).is_none());
        DeployLock::acquire(&paths, "deploy r2", 1_002).unwrap();
    }

    #[test]
    fn an_expired_lock_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let paths = EnvPaths::for_root_for_tests(dir.path());
        let old = DeployLock::acquire(&paths, "deploy r1", 1_000).unwrap();
        std::mem::forget(old); // as if its holder vanished without cleaning up
        let later = 1_000 + LOCK_TTL.as_secs();
        let _lock = DeployLock::acquire(&paths, "deploy r2", later).unwrap();
        assert_eq!(lock_holder(&paths).unwrap().operation, "deploy r2");
    }

    #[test]
    fn a_lock_of_a_dead_process_on_this_host_is_stale() {
        let holder = LockHolder {
            who: crate::release::who(),
            pid: i32::MAX,
            operation: "deploy".into(),
            since: 0,
            expires: u64::MAX,
        };
        assert!(is_stale(&holder, 1));
        let elsewhere = LockHolder {
            who: "ci@another-host".into(),
            ..holder
        };
        assert!(!is_stale(&elsewhere, 1));
    }
}
