//! The keeper: the smallest process that keeps the supervisor running.
//!
//! `rigger up` starts the keeper (detached), and the keeper starts the supervisor as its
//! child. When the supervisor dies of a signal (SIGKILL, a crash) or panics, the keeper starts
//! a new one at once; the new supervisor adopts the services still running
//! ([`crate::supervisor`]) and finishes or undoes what the dead one left, so the site never
//! notices. The keeper does nothing else: no configuration, no services, no state but its
//! record (`keeper.json`: who it is, how many times it restarted the supervisor, and why),
//! which `rigger status` shows.
//!
//! What it does not restart: a supervisor that exited by itself. Exit 0 is a clean stop
//! (`rigger down`); any other code is a failure the supervisor reported in its status (a
//! bring-up that failed), which starting it again would only repeat. Nor, after five deaths in
//! a row of supervisors that never came up (a crash loop: each died before reporting the
//! environment ready), a sixth, saying so in the record. A supervisor that came up and was
//! then killed is no sign of a loop, however often it happens.
//!
//! Stopping: SIGTERM (or SIGINT) to the keeper is passed to the supervisor, which stops every
//! service; the keeper then exits without restarting it, even if the supervisor is killed
//! while it stops. `rigger down` signals the keeper for this reason, not the supervisor.
//!
//! Why a keeper of rigger's own rather than a systemd unit: the local provider must run where
//! PID 1 is not systemd (containers, CI, this project's own test machines), and one mechanism
//! everywhere is one mechanism tested. Its limit: a killed keeper is not restarted.

use std::os::unix::process::ExitStatusExt as _;
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{SignalKind, signal};

use crate::environment::LocalEnvironment;
use crate::process::{self, PidRecord};

/// More deaths in a row than this of supervisors that never came up, and the keeper gives up.
const CRASH_LOOP_DEATHS: u32 = 5;
/// The exit code of a Rust program that panicked.
const PANIC_EXIT_CODE: i32 = 101;

/// What `keeper.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeeperRecord {
    /// The keeper itself (pid and kernel start time: never confused with a later process).
    pub keeper: PidRecord,
    /// The supervisor it runs now.
    pub supervisor_pid: Option<i32>,
    /// How many times it started the supervisor again after a death.
    pub restarts: u32,
    /// The last death: why, and when (Unix seconds).
    pub last_restart: Option<Restart>,
    /// Set when the keeper gave up (a crash loop).
    #[serde(default)]
    pub gave_up: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restart {
    pub why: String,
    pub at: u64,
}

/// The record of the keeper running `env`, if one runs.
pub fn running(env: &LocalEnvironment) -> Option<KeeperRecord> {
    let bytes = std::fs::read(env.paths.keeper()).ok()?;
    let record: KeeperRecord = serde_json::from_slice(&bytes).ok()?;
    record.keeper.is_alive().then_some(record)
}

/// Asks the keeper of `env` to stop the supervisor and end, if one runs. Returns its pid.
pub fn stop(env: &LocalEnvironment) -> anyhow::Result<Option<i32>> {
    let Some(record) = running(env) else {
        return Ok(None);
    };
    process::signal(&record.keeper, Signal::SIGTERM).context("signalling the keeper")?;
    Ok(Some(record.keeper.pid))
}

/// Why a supervisor that ended with `status` should be started again, or `None` when it
/// must not be (it stopped cleanly or reported a failure).
pub fn restart_reason(status: std::process::ExitStatus) -> Option<String> {
    if let Some(number) = status.signal() {
        let name = Signal::try_from(number).map_or_else(|_| number.to_string(), |s| s.to_string());
        return Some(format!("killed by {name}"));
    }
    (status.code() == Some(PANIC_EXIT_CODE)).then(|| "panicked".to_owned())
}

/// Runs the keeper until the supervisor ends for good; returns the exit code to end with.
/// `supervisor` makes the command that runs one.
pub async fn keep(
    env: &LocalEnvironment,
    supervisor: impl Fn() -> tokio::process::Command,
) -> anyhow::Result<i32> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut record = KeeperRecord {
        keeper: PidRecord::of_this_process("keeper")?,
        supervisor_pid: None,
        restarts: 0,
        last_restart: None,
        gave_up: None,
    };
    // Deaths in a row of supervisors that never reported the environment up.
    let mut early_deaths: u32 = 0;
    let mut stopping = false;
    loop {
        let mut child = supervisor()
            .kill_on_drop(false)
            .spawn()
            .context("starting the supervisor")?;
        let pid = child.id().and_then(|id| i32::try_from(id).ok());
        record.supervisor_pid = pid;
        save(env, &record)?;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status.context("waiting for the supervisor")?,
                _ = terminate.recv() => stopping = true,
                _ = interrupt.recv() => stopping = true,
            }
            if let Some(pid) = pid {
                // Passed on: the supervisor stops every service, then exits.
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM);
            }
        };
        let why = match restart_reason(status) {
            Some(why) if !stopping => why,
            _ => {
                let _ = std::fs::remove_file(env.paths.keeper());
                return Ok(status.code().unwrap_or(0));
            }
        };
        if pid.is_some_and(|pid| came_up(env, pid)) {
            early_deaths = 0;
        }
        early_deaths += 1;
        if early_deaths > CRASH_LOOP_DEATHS {
            let gave_up = format!(
                "{early_deaths} supervisors in a row died before the environment was up (last: \
                 {why}); not starting another (see supervisor.log)"
            );
            tracing::error!("{gave_up}");
            record.gave_up = Some(gave_up);
            record.supervisor_pid = None;
            save(env, &record)?;
            return Ok(1);
        }
        record.restarts += 1;
        record.last_restart = Some(Restart {
            why: why.clone(),
            at: rigger_engine::clock::unix_now(),
        });
        save(env, &record)?;
        tracing::warn!(
            restarts = record.restarts,
            "the supervisor {why}; starting it again"
        );
        // A supervisor that came up restarts at once; one that died starting backs off.
        let pause = Duration::from_millis(200) * (1 << (early_deaths - 1).min(4));
        if early_deaths > 1 {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = terminate.recv() => return Ok(0),
                _ = interrupt.recv() => return Ok(0),
            }
        }
    }
}

/// Whether supervisor `pid` had reported the environment up (its last status is its own and
/// past starting) before it died.
fn came_up(env: &LocalEnvironment, pid: i32) -> bool {
    use rigger_plan::status::Phase;
    crate::status::load(&env.paths.status()).is_some_and(|status| {
        status.supervisor_pid == Some(pid)
            && !matches!(status.phase, Phase::Starting | Phase::Failed)
    })
}

fn save(env: &LocalEnvironment, record: &KeeperRecord) -> anyhow::Result<()> {
    let path = env.paths.keeper();
    let json = serde_json::to_vec_pretty(record)?;
    crate::files::write_atomically(&path, &json)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::ExitStatus;

    #[test]
    fn only_deaths_are_restarted() {
        // Wait statuses as the kernel encodes them: a signal in the low bits, a code above.
        let killed = ExitStatus::from_raw(Signal::SIGKILL as i32);
        assert_eq!(restart_reason(killed).as_deref(), Some("killed by SIGKILL"));
        let panicked = ExitStatus::from_raw(101 << 8);
        assert_eq!(restart_reason(panicked).as_deref(), Some("panicked"));
        for clean_or_failed in [0, 1 << 8, 2 << 8] {
            assert_eq!(restart_reason(ExitStatus::from_raw(clean_or_failed)), None);
        }
    }
}
