//! Readiness probes: is a service answering yet? Never a fixed sleep.
//!
//! A [`Probe`] is a value (a TCP connect, an HTTPS request through the system `curl`, or a
//! command such as `pg_isready`); [`check`] runs it once and says why it is not ready, and
//! [`wait_ready`] polls it with a short backoff (20 ms doubling to 250 ms) until it succeeds,
//! the service dies (then the error quotes the end of its log), or the time is up (then the
//! error gives the last reason). Every probe process is killed if the wait is abandoned.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::Instant;

use crate::process;

/// The first pause between two checks; doubled after each failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// How long one TCP connect or one HTTPS request may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How many log lines a [`ProbeError::Died`] quotes.
const LOG_TAIL_LINES: usize = 20;

/// How to tell that a service is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A TCP connection is accepted.
    Tcp { addr: IpAddr, port: u16 },
    /// `GET https://host:port/path`, with `host` resolved to `addr` (so both SNI and the Host
    /// header carry `host`), certificate not verified, answers `expect_status`.
    Https {
        addr: IpAddr,
        port: u16,
        path: String,
        host: String,
        expect_status: u16,
    },
    /// The command exits with status 0. It gets exactly `env` (plus a default `PATH`) and runs
    /// as `user` when rigger is root, like a service.
    Command {
        program: PathBuf,
        args: Vec<String>,
        env: BTreeMap<String, String>,
        user: Option<String>,
        /// Working directory; rigger's own when `None`.
        cwd: Option<PathBuf>,
    },
}

/// Why [`wait_ready`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{probe} was not ready after {}: {last}", millis(*timeout))]
    TimedOut {
        probe: String,
        timeout: Duration,
        /// Why the last check failed.
        last: String,
    },
    #[error("the service exited after {} while waiting for {probe}{}", millis(*after), tail(log.as_deref(), log_tail))]
    Died {
        probe: String,
        after: Duration,
        log: Option<PathBuf>,
        /// The last lines of `log`.
        log_tail: Vec<String>,
    },
}

/// Runs the probe once: `Ok` when ready, otherwise why not.
pub async fn check(probe: &Probe) -> Result<(), String> {
    match probe {
        Probe::Tcp { addr, port } => check_tcp(SocketAddr::new(*addr, *port)).await,
        Probe::Https {
            addr,
            port,
            path,
            host,
            expect_status,
        } => check_https(*addr, *port, path, host, *expect_status).await,
        Probe::Command {
            program,
            args,
            env,
            user,
            cwd,
        } => check_command(program, args, env, user.as_deref(), cwd.as_deref()).await,
    }
}

/// Polls `probe` until it succeeds and returns how long that took.
///
/// Gives up early when `is_alive()` turns false (the service died: the error quotes the last
/// lines of `log` when given) and after `timeout` (the error gives the last failure reason).
/// A check still running when the time is up is abandoned (its process killed).
pub async fn wait_ready(
    probe: &Probe,
    timeout: Duration,
    is_alive: impl Fn() -> bool,
    log: Option<&Path>,
) -> Result<Duration, ProbeError> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut backoff = FIRST_BACKOFF;
    let mut last = None;
    loop {
        if !is_alive() {
            return Err(ProbeError::Died {
                probe: probe.to_string(),
                after: start.elapsed(),
                log: log.map(Path::to_path_buf),
                log_tail: log.map_or_else(Vec::new, |log| process::log_tail(log, LOG_TAIL_LINES)),
            });
        }
        match tokio::time::timeout_at(deadline, check(probe)).await {
            Ok(Ok(())) => return Ok(start.elapsed()),
            Ok(Err(why)) => {
                tracing::trace!(%probe, reason = %why, "not ready yet");
                last = Some(why);
            }
            // A check cut short by the deadline says nothing new; keep the reason before it.
            Err(_) => {
                last.get_or_insert_with(|| "the check did not finish in time".to_string());
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(ProbeError::TimedOut {
                probe: probe.to_string(),
                timeout,
                last: last.unwrap_or_default(),
            });
        }
        tokio::time::sleep(backoff.min(deadline - now)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Tcp { addr, port } => write!(f, "tcp {}", SocketAddr::new(*addr, *port)),
            Probe::Https {
                addr,
                port,
                path,
                host,
                expect_status,
            } => write!(
                f,
                "https://{host}:{port}{path} at {addr} (expecting {expect_status})"
            ),
            Probe::Command { program, args, .. } => {
                write!(f, "`{}", program.display())?;
                for arg in args {
                    write!(f, " {arg}")?;
                }
                write!(f, "`")
            }
        }
    }
}

async fn check_tcp(addr: SocketAddr) -> Result<(), String> {
    match tokio::time::timeout(CHECK_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(err)) => Err(format!("connecting to {addr}: {err}")),
        Err(_) => Err(format!(
            "connecting to {addr}: no answer within {}",
            millis(CHECK_TIMEOUT)
        )),
    }
}

async fn check_https(
    addr: IpAddr,
    port: u16,
    path: &str,
    host: &str,
    expect_status: u16,
) -> Result<(), String> {
    let resolved = match addr {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let output = Command::new("curl")
        .args(["-sS", "-k", "--noproxy", "*", "-o", "/dev/null"])
        .args(["-w", "%{http_code}", "--max-time"])
        .arg(CHECK_TIMEOUT.as_secs().to_string())
        .arg("--resolve")
        .arg(format!("{host}:{port}:{resolved}"))
        .arg(format!("https://{host}:{port}{path}"))
        .env_clear()
        .env("PATH", process::DEFAULT_PATH)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|err| format!("running curl: {err}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!("curl: {}", last_line(&stderr)));
    }
    let status = String::from_utf8_lossy(&output.stdout);
    if status.trim() == expect_status.to_string() {
        Ok(())
    } else {
        Err(format!(
            "answered HTTP {}, not {expect_status}",
            status.trim()
        ))
    }
}

async fn check_command(
    program: &Path,
    args: &[String],
    env: &BTreeMap<String, String>,
    user: Option<&str>,
    cwd: Option<&Path>,
) -> Result<(), String> {
    let name = program.display().to_string();
    let mut command =
        process::command(&name, program, args, env, user).map_err(|err| err.to_string())?;
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    let output = command
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|err| format!("running {name}: {err}"))?;
    if output.status.success() {
        return Ok(());
    }
    let mut said = String::from_utf8_lossy(&output.stderr).into_owned();
    if said.trim().is_empty() {
        said = String::from_utf8_lossy(&output.stdout).into_owned();
    }
    let status = match output.status.code() {
        Some(code) => format!("exited with {code}"),
        None => format!("ended by {}", output.status),
    };
    match last_line(&said) {
        "" => Err(format!("{name} {status}")),
        line => Err(format!("{name} {status}: {line}")),
    }
}

fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("")
        .trim()
}

fn millis(duration: Duration) -> String {
    if duration < Duration::from_secs(1) {
        format!("{} ms", duration.as_millis())
    } else {
        format!("{:.1} s", duration.as_secs_f64())
    }
}

fn tail(log: Option<&Path>, lines: &[String]) -> String {
    match (log, lines.is_empty()) {
        (None, _) => String::new(),
        (Some(log), true) => format!("; its log {} is empty", log.display()),
        (Some(log), false) => {
            let mut text = format!("; last lines of {}:", log.display());
            for line in lines {
                text.push_str("\n    ");
                text.push_str(line);
            }
            text
        }
    }
}
