//! Running commands on servers, whatever reaches them: processes on this machine for the local
//! provider's servers, the system OpenSSH client (multiplexed, host keys pinned to the ones
//! each server published) for real ones.
//!
//! Start at [`Transport`]: run a [`Job`] (a [`rigger_recipes::Command`], optionally with the
//! server's app environment file) and stream its output line by line, copy a file, or build the
//! process of an interactive session. [`local::LocalTransport`] and [`ssh::SshTransport`]
//! implement it; [`wrap`] turns a job into the exact command line each one runs (pure, tested
//! by comparing text), and [`fanout`] runs one job on many servers at once with bounded
//! concurrency, prefixed output and a per-server summary.
//!
//! Architecture invariant: secrets never appear on a command line built here: the app's
//! environment is loaded on the server, by the user the command runs as, from its 0600 file.

pub mod fanout;
pub mod local;
pub mod ssh;
mod stream;
pub mod wrap;

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

pub use rigger_recipes::Command;

/// What the [`Transport`] methods return: a boxed future, so that transports can be mixed
/// behind `dyn Transport`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Which output of a command a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Receives a command's output, one line at a time (without its newline; invalid UTF-8 is
/// replaced). Called from the task that reads the command's pipes, so it must not block long.
pub trait OutputSink: Send + Sync {
    fn line(&self, stream: Stream, line: &str);
}

impl<F> OutputSink for F
where
    F: Fn(Stream, &str) + Send + Sync,
{
    fn line(&self, stream: Stream, line: &str) {
        self(stream, line);
    }
}

/// A command to run on a server, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The program, arguments, extra variables, working directory and user.
    pub command: Command,
    /// An environment file on the server (rigger's `KEY=value` files, see
    /// [`rigger_recipes::envfile`], which a POSIX shell reads as systemd does) loaded into the
    /// command's environment by the user it runs as, e.g. the app's `app.env`.
    pub env_file: Option<PathBuf>,
}

impl Job {
    pub fn new(command: Command) -> Job {
        Job {
            command,
            env_file: None,
        }
    }

    /// Loads `path` (on the server) into the command's environment.
    pub fn env_file(mut self, path: impl Into<PathBuf>) -> Job {
        self.env_file = Some(path.into());
        self
    }
}

impl From<Command> for Job {
    fn from(command: Command) -> Job {
        Job::new(command)
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code (0 is success).
    Code(i32),
    /// A signal killed it (local processes only: SSH reports a remote signal as code 255).
    Signal(i32),
}

impl ExitStatus {
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }

    /// The code to exit with when passing this status on: the code, or 128 + the signal as a
    /// shell does.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Code(code) => code,
            ExitStatus::Signal(signal) => 128 + signal,
        }
    }

    fn from_std(status: std::process::ExitStatus) -> ExitStatus {
        use std::os::unix::process::ExitStatusExt as _;
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitStatus::Code(code),
            (None, Some(signal)) => ExitStatus::Signal(signal),
            (None, None) => ExitStatus::Code(-1),
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exit {code}"),
            ExitStatus::Signal(signal) => write!(f, "killed by signal {signal}"),
        }
    }
}

/// Reaches one server: runs commands on it, copies files to it, opens sessions on it.
///
/// Methods take `&self` and may be called concurrently (an SSH transport multiplexes every
/// command over one connection).
pub trait Transport: Send + Sync {
    /// The server's name, as output is prefixed with (`web-1`).
    fn server(&self) -> &str;

    /// How the server is reached, for messages (`ssh admin@203.0.113.7:22`, `local 127.77.1.1`).
    fn describe(&self) -> String;

    /// Makes sure the server can be reached (for SSH: the multiplexed master connection is up
    /// and the host key checked), so that a failure to connect is told apart from a command
    /// that fails. [`Transport::run`] connects by itself when needed.
    fn connect(&self) -> BoxFuture<'_, Result<(), TransportError>>;

    /// Runs `job` to completion, passing each line of its output to `output`, and returns how
    /// it ended. Its standard input is empty.
    fn run<'a>(
        &'a self,
        job: &'a Job,
        output: &'a dyn OutputSink,
    ) -> BoxFuture<'a, Result<ExitStatus, TransportError>>;

    /// Copies the local file `source` to `destination` on the server with `mode`, atomically
    /// (a temporary file beside it, then a rename), owned by the user the transport acts as.
    fn copy_file<'a>(
        &'a self,
        source: &'a Path,
        destination: &'a Path,
        mode: u32,
    ) -> BoxFuture<'a, Result<(), TransportError>>;

    /// The process of an interactive session on the server, to be run with this terminal:
    /// `job` in it (given a terminal when `tty`), or a login shell when `None`.
    fn interactive(&self, job: Option<&Job>, tty: bool) -> std::process::Command;
}

/// Runs the process of an interactive session (from [`Transport::interactive`]) on this
/// terminal and returns how it ended. Ctrl-C and Ctrl-\ go to the session, not to rigger,
/// which handles them by doing nothing while the session runs.
pub async fn run_interactive(process: std::process::Command) -> std::io::Result<ExitStatus> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    let mut child = tokio::process::Command::from(process).spawn()?;
    loop {
        tokio::select! {
            status = child.wait() => return Ok(ExitStatus::from_std(status?)),
            _ = interrupt.recv() => {}
            _ = quit.recv() => {}
        }
    }
}

/// Why a server could not be reached, or a command not run. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot reach {server} ({address}): {reason}")]
    Unreachable {
        server: String,
        address: String,
        reason: String,
    },
    #[error(
        "the host key of {server} ({address}) is not the one rigger recorded in {}: someone may be \
         intercepting the connection, or the server was rebuilt at the same address. Only if you \
         know it was rebuilt, forget the old key with {fix} and retry",
        known_hosts.display()
    )]
    HostKeyChanged {
        server: String,
        address: String,
        known_hosts: PathBuf,
        /// The commands that forget the recorded key, in backquotes.
        fix: String,
    },
    #[error(
        "{server} ({address}) did not show any of the host keys it published ({published_in}): \
         someone may be intercepting the connection, or the address now belongs to another \
         machine; rigger does not connect. `rigger status` shows whether the server still runs"
    )]
    HostKeyNotPublished {
        server: String,
        address: String,
        /// Where the server published its keys.
        published_in: String,
    },
    #[error(
        "no host key of {server} ({address}) is recorded in {}, and this server was not created \
         by rigger, so its key is not trusted on first sight; check its fingerprint, then add its \
         key to that file (e.g. `ssh-keyscan -p PORT HOST >> {}`)",
        known_hosts.display(), known_hosts.display()
    )]
    HostKeyUnknown {
        server: String,
        address: String,
        known_hosts: PathBuf,
    },
    #[error(
        "{server} ({address}) refused {user}'s key: {reason}; check the identity file and that \
         its public key is in {user}'s authorized_keys on the server"
    )]
    AuthenticationFailed {
        server: String,
        address: String,
        user: String,
        reason: String,
    },
    #[error("lost the connection to {server} ({address}) while running a command: {reason}")]
    ConnectionLost {
        server: String,
        address: String,
        reason: String,
    },
    #[error("cannot start `{program}` for {server}; is it installed?")]
    Spawn {
        server: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} for {server}")]
    Io {
        server: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("copying {} to {server}:{} failed: {reason}", source_path.display(), destination.display())]
    Copy {
        server: String,
        source_path: PathBuf,
        destination: PathBuf,
        reason: String,
    },
}

impl TransportError {
    /// The command never ran because the server could not be reached or trusted (as opposed
    /// to a local failure to start a process).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            TransportError::Unreachable { .. }
                | TransportError::HostKeyChanged { .. }
                | TransportError::HostKeyNotPublished { .. }
                | TransportError::HostKeyUnknown { .. }
                | TransportError::AuthenticationFailed { .. }
        )
    }
}
