//! What the command line asks of a local environment: `up`, `down`, `status`, `scale`. These
//! talk to the environment's supervisor through its lock, its status file, its desired-counts
//! file and signals; they never touch a service process directly, except `down` cleaning up
//! after a supervisor that was killed.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::environment::LocalEnvironment;
use crate::process;
use crate::status::{Phase, ReplicaStatus, Status};
use crate::supervisor::{self, DesiredCounts};

/// How long `up` waits for a first bring-up (the venv's first install dominates).
const UP_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Debug, Clone, PartialEq)]
pub enum UpOutcome {
    /// The supervisor was started and the environment is ready.
    Started(Status),
    /// It was already up and healthy: nothing changed.
    AlreadyUp(Status),
    /// It was up; the desired counts changed and it is ready again.
    Updated(Status),
}

/// Brings the environment up, or confirms it is. `progress` receives one line per phase.
pub async fn up(
    env: &LocalEnvironment,
    rigger: &Path,
    config_path: &Path,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<UpOutcome> {
    if let Some(holder) = supervisor::lock_holder(env) {
        let status = Status::load(&env.paths.status());
        let desired_now = desired_counts(env);
        let matches = status.as_ref().is_some_and(|s| {
            s.phase == Phase::Ready
                && s.groups.iter().map(|g| g.desired).collect::<Vec<_>>() == desired_now
        });
        if matches {
            return Ok(UpOutcome::AlreadyUp(status.expect("checked")));
        }
        // Running but not matching: ask it to reconcile and wait.
        kill(Pid::from_raw(holder.pid), Signal::SIGHUP).context("signalling the supervisor")?;
        progress("asked the running supervisor to reconcile");
        let status = wait_ready(env, holder.pid, &mut progress).await?;
        return Ok(UpOutcome::Updated(status));
    }
    let _ = std::fs::remove_file(env.paths.status());
    std::fs::create_dir_all(env.paths.root())
        .with_context(|| format!("creating {}", env.paths.root().display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(env.paths.supervisor_log())
        .with_context(|| format!("opening {}", env.paths.supervisor_log().display()))?;
    let config_path =
        std::fs::canonicalize(config_path).unwrap_or_else(|_| config_path.to_path_buf());
    let child = std::process::Command::new(rigger)
        .arg("--config")
        .arg(&config_path)
        .args(["-e", &env.name, "-v", "supervise"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: the user's Ctrl-C on `up` must not reach the supervisor.
        .process_group(0)
        .spawn()
        .context("starting the supervisor")?;
    let pid = i32::try_from(child.id()).unwrap_or(0);
    // The child is not waited on: it outlives this process by design. Reaped by init.
    drop(child);
    progress(&format!(
        "supervisor started (pid {pid}, log {})",
        env.paths.supervisor_log().display()
    ));
    let status = wait_ready(env, pid, &mut progress).await?;
    Ok(UpOutcome::Started(status))
}

use std::os::unix::process::CommandExt as _;

fn desired_counts(env: &LocalEnvironment) -> Vec<u32> {
    let counts = DesiredCounts::load(&env.paths.desired());
    vec![
        counts.web.unwrap_or(env.env().web.desired),
        counts.worker.unwrap_or(env.env().worker.desired),
    ]
}

/// Follows status.json until the supervisor says ready or failed, or dies.
async fn wait_ready(
    env: &LocalEnvironment,
    pid: i32,
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<Status> {
    let start = Instant::now();
    let mut last_message = String::new();
    loop {
        if let Some(status) = Status::load(&env.paths.status()) {
            if status.message != last_message {
                progress(&status.message);
                last_message.clone_from(&status.message);
            }
            match status.phase {
                Phase::Ready if status.supervisor_pid == Some(pid) => return Ok(status),
                Phase::Failed => bail!(
                    "the environment did not come up: {}\n(supervisor log: {})",
                    status.message,
                    env.paths.supervisor_log().display()
                ),
                _ => {}
            }
        }
        if !pid_alive(pid) {
            let tail = process::log_tail(&env.paths.supervisor_log(), 15).join("\n  ");
            bail!(
                "the supervisor exited before the environment was ready; its log ends with:\n  {tail}"
            );
        }
        if start.elapsed() > UP_TIMEOUT {
            bail!(
                "the environment was not ready after {} s: {last_message}",
                UP_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn pid_alive(pid: i32) -> bool {
    // A zombie (exited, not yet reaped by its parent) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Stops everything the environment runs. With `purge`, also deletes its data and secrets.
pub async fn down(
    env: &LocalEnvironment,
    purge: bool,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<()> {
    if let Some(holder) = supervisor::lock_holder(env) {
        progress(&format!(
            "stopping the supervisor (pid {}) and every service",
            holder.pid
        ));
        kill(Pid::from_raw(holder.pid), Signal::SIGTERM).context("signalling the supervisor")?;
        let start = Instant::now();
        while supervisor::lock_holder(env).is_some() {
            if start.elapsed() > Duration::from_secs(180) {
                bail!(
                    "the supervisor (pid {}) did not stop within 180 s",
                    holder.pid
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Whatever a killed supervisor left behind.
    for (name, outcome) in
        process::stop_leftovers(&env.paths.servers(), Duration::from_secs(60)).await
    {
        progress(&format!(
            "stopped {name} left by an earlier supervisor ({outcome:?})"
        ));
    }
    let _ = std::fs::remove_file(env.paths.status());
    if purge && env.paths.root().exists() {
        std::fs::remove_dir_all(env.paths.root())
            .with_context(|| format!("deleting {}", env.paths.root().display()))?;
        progress(&format!(
            "deleted {} (data, secrets, logs)",
            env.paths.root().display()
        ));
    }
    Ok(())
}

/// The environment's status, with replication measured now. `None` when it is not running.
pub async fn status(env: &LocalEnvironment) -> Option<Status> {
    supervisor::lock_holder(env)?;
    let mut status = Status::load(&env.paths.status())?;
    status.replication = replication(env).await;
    Some(status)
}

/// Each replica's state and lag as the primary sees it. Lag in seconds is `replay_lag`, which
/// PostgreSQL resets to null when the replica has replayed everything, so an idle primary does
/// not look lagged; it is reported as 0 then.
async fn replication(env: &LocalEnvironment) -> Vec<ReplicaStatus> {
    let socket = env
        .paths
        .server(crate::environment::DB_PRIMARY)
        .join("run/postgresql");
    let query = "SELECT application_name, state, COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::bigint, \
                 COALESCE(EXTRACT(EPOCH FROM replay_lag), 0)::float8 FROM pg_stat_replication ORDER BY 1";
    let mut command = tokio::process::Command::new("setpriv");
    command
        .args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
            "psql",
            "-XAtq",
            "-F",
            "|",
            "-h",
        ])
        .arg(&socket)
        .args([
            "-p", "5432", "-U", "postgres", "-d", "postgres", "-c", query,
        ])
        .env_clear()
        .env("PATH", process::DEFAULT_PATH)
        .env("HOME", "/tmp")
        .kill_on_drop(true);
    let Ok(Ok(output)) = tokio::time::timeout(Duration::from_secs(5), command.output()).await
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split('|').collect();
            let [id, state, bytes, seconds] = fields[..] else {
                return None;
            };
            Some(ReplicaStatus {
                id: id.to_owned(),
                state: state.to_owned(),
                lag_bytes: bytes.parse().ok(),
                lag_seconds: seconds.parse().ok(),
            })
        })
        .collect()
}

/// Sets a group's desired count (within its min and max) and tells the supervisor.
pub fn scale(env: &LocalEnvironment, group: &str, count: u32) -> anyhow::Result<()> {
    let sizing = match group {
        "web" => &env.env().web,
        "worker" => &env.env().worker,
        other => bail!("no group `{other}`: the groups are `web` and `worker`"),
    };
    if count < sizing.min || count > sizing.max {
        bail!(
            "{group}={count} is outside the group's bounds {}..={} (set [environments.{}.{group}] min/max in rigger.toml)",
            sizing.min,
            sizing.max,
            env.name
        );
    }
    let mut counts = DesiredCounts::load(&env.paths.desired());
    match group {
        "web" => counts.web = Some(count),
        _ => counts.worker = Some(count),
    }
    std::fs::create_dir_all(env.paths.root())?;
    counts.save(&env.paths.desired())?;
    if let Some(holder) = supervisor::lock_holder(env) {
        kill(Pid::from_raw(holder.pid), Signal::SIGHUP).context("signalling the supervisor")?;
    }
    Ok(())
}
