//! PgBouncer's admin console on a local app server, as the supervisor drives it during a
//! failover: `PAUSE`, `RESUME` (and the deadline that ends a pause by itself).
//!
//! A planned failover pauses every app server's pool, so that writes wait instead of failing
//! while the primary changes. If the supervisor died between `PAUSE` and `RESUME`, nothing
//! would ever resume them and the site would wait for ever. So before pausing a pool, the
//! supervisor arms a [`ResumeDeadline`]: a helper process detached from it (the leader of its
//! own process group, recorded in a pid file under the server's `pids/`, like every process
//! rigger starts) that sleeps until the deadline and then sends `RESUME` itself. Once the
//! supervisor has resumed the pool, it disarms (stops) the helper. `rigger down`, and a new
//! supervisor (which restarts every PgBouncer anyway), stop a helper left behind with
//! everything else. The deadline and the rule for when a failover may still go past its point
//! of no return are the AWS provider's too ([`rigger_recipes::operations::PAUSE_DEADLINE`]).
//!
//! The helper runs as the supervisor's user (root): the admin password is in its environment,
//! which only that user can read, and never on a command line.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::Signal;

use crate::process::{self, DEFAULT_PATH, ProcessSpec, Supervised};

/// What PgBouncer answers `RESUME` with when the pool is not paused.
const NOT_PAUSED: &str = "not paused";

/// How long the helper may take to stop when disarmed.
const HELPER_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// PgBouncer's admin console on one server, as rigger's admin user.
#[derive(Clone)]
pub struct AdminConsole {
    pub host: String,
    pub port: u16,
    pub user: String,
    password: String,
}

impl std::fmt::Debug for AdminConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConsole")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// How a `RESUME` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    /// This `RESUME` resumed the pool.
    Now,
    /// The pool was not paused: its deadline (or someone else) had resumed it already.
    Already,
}

impl AdminConsole {
    /// The console at `host:port`, logged in to as `user` (rigger's admin user,
    /// [`rigger_recipes::PGBOUNCER_ADMIN_USER`]) with `password`.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> AdminConsole {
        AdminConsole {
            host: host.into(),
            port,
            user: user.into(),
            password: password.into(),
        }
    }

    /// The console of the PgBouncer of the app server at `address` (on rigger's port for it),
    /// as rigger's admin user with `password`: the one way rigger talks to a local PgBouncer.
    pub fn of_server(address: impl Into<String>, password: impl Into<String>) -> AdminConsole {
        AdminConsole::new(
            address,
            rigger_recipes::Ports::default().pgbouncer,
            rigger_recipes::PGBOUNCER_ADMIN_USER,
            password,
        )
    }

    /// The libpq connection string (no password: it travels in `PGPASSWORD`).
    fn conninfo(&self) -> String {
        format!(
            "host={} port={} dbname=pgbouncer user={} sslmode=disable",
            self.host, self.port, self.user
        )
    }

    /// The environment of a `psql` on the console: the password, a connect timeout, `PATH`.
    fn psql_env(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("PATH".to_owned(), DEFAULT_PATH.to_owned()),
            ("PGPASSWORD".to_owned(), self.password.clone()),
            ("PGCONNECT_TIMEOUT".to_owned(), "5".to_owned()),
        ])
    }

    /// Runs one admin command (`PAUSE`, `SHOW POOLS`) and returns its rows; fails after
    /// `timeout` (`PAUSE` waits for running transactions to end).
    pub async fn run(&self, command: &str, timeout: Duration) -> anyhow::Result<String> {
        let output = tokio::time::timeout(
            timeout,
            tokio::process::Command::new("psql")
                .arg(self.conninfo())
                .args(["-XAtq", "-F", "|", "-c", command])
                .env_clear()
                .envs(self.psql_env())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .with_context(|| {
            format!(
                "`{command}` on {}:{} did not finish within {} s",
                self.host,
                self.port,
                timeout.as_secs()
            )
        })?
        .context("starting psql")?;
        if !output.status.success() {
            bail!(
                "`{command}` on {}:{}: {}",
                self.host,
                self.port,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `RESUME`; a pool that is not paused (its deadline resumed it) is [`Resumed::Already`].
    pub async fn resume(&self, timeout: Duration) -> anyhow::Result<Resumed> {
        match self.run("RESUME", timeout).await {
            Ok(_) => Ok(Resumed::Now),
            Err(error) if format!("{error:#}").contains(NOT_PAUSED) => Ok(Resumed::Already),
            Err(error) => Err(error),
        }
    }
}

/// Where a [`ResumeDeadline`]'s helper keeps its pid file and its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperFiles {
    /// The pid file: under the server's `pids/`, so `rigger down` and a new supervisor stop a
    /// helper left behind.
    pub pid: PathBuf,
    /// What `psql` said when the deadline fired (`rigger logs SERVER --service
    /// pgbouncer-resume`).
    pub log: PathBuf,
}

/// A `RESUME` armed to fire at a deadline, whatever happens to the process that armed it.
#[derive(Debug)]
pub struct ResumeDeadline {
    helper: Supervised,
    at: Instant,
}

impl ResumeDeadline {
    /// Starts the helper that sends `RESUME` to `console` once `after` has passed: `sh`
    /// sleeping, then `psql`, in a process group of its own (a signal to the supervisor's
    /// group does not reach it), recorded in `files.pid`. `name` names it in pid records and
    /// logs (`web-1/pgbouncer-resume`).
    pub async fn arm(
        name: &str,
        console: &AdminConsole,
        after: Duration,
        files: &HelperFiles,
    ) -> anyhow::Result<ResumeDeadline> {
        let at = Instant::now() + after;
        let spec = ProcessSpec {
            name: name.to_owned(),
            program: PathBuf::from("/bin/sh"),
            args: vec![
                "-c".into(),
                r#"sleep "$1" && exec psql "$2" -XAtq -c RESUME"#.into(),
                "rigger-pgbouncer-resume".into(),
                format!("{:.3}", after.as_secs_f64()),
                console.conninfo(),
            ],
            env: console.psql_env(),
            cwd: None,
            user: None,
            log_path: files.log.clone(),
            pid_path: files.pid.clone(),
            stop_signal: Signal::SIGTERM,
            stop_timeout: HELPER_STOP_TIMEOUT,
        };
        let helper = process::spawn(&spec)
            .await
            .with_context(|| format!("arming the pause deadline of {name}"))?;
        Ok(ResumeDeadline { helper, at })
    }

    /// How long until the deadline fires (zero once it has).
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// The helper's pid record (for tests and diagnostics).
    pub fn record(&self) -> process::PidRecord {
        self.helper.record()
    }

    /// Stops the helper before it fires (after the supervisor's own `RESUME`); its pid file
    /// goes with it. One that already fired has exited: nothing to stop.
    pub async fn disarm(mut self) {
        process::stop_supervised(&mut self.helper, Signal::SIGTERM, HELPER_STOP_TIMEOUT).await;
    }
}
