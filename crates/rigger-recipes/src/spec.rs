//! What a recipe asks a provider to make true on one server: directories, files, long-running
//! services and one-shot steps. All of it is plain data; see [`Recipe`].

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::Command;
use crate::error::RenderError;

/// Everything one role (or, merged, one server) needs.
///
/// A provider applies a recipe in this order: create `dirs` (parents first, as listed), write
/// `files`, run the [`Phase::BeforeStart`] `steps` in order, start `services` in an order
/// that respects `depends_on` and wait for each one's readiness probe, then run the
/// [`Phase::AfterStart`] steps in order. Every part is idempotent, so applying a recipe
/// again converges instead of failing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Recipe {
    pub dirs: Vec<DirSpec>,
    pub files: Vec<FileSpec>,
    pub services: Vec<ServiceSpec>,
    pub steps: Vec<StepSpec>,
}

/// A directory to create (with its parents) and to give this owner and mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirSpec {
    pub path: PathBuf,
    /// Permission bits, e.g. `0o700`.
    pub mode: u32,
    /// User name; the group is the user's group of the same name.
    pub owner: String,
}

/// A file to write whole (never patched) with this owner and mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileSpec {
    pub path: PathBuf,
    pub contents: String,
    /// Permission bits, e.g. `0o600`.
    pub mode: u32,
    /// User name, or `user:group`; without a group, the user's group of the same name.
    pub owner: String,
    /// The contents include a secret value. Such files have mode 0600 (or 0640, owned by
    /// root and readable by one group); a provider must not log or display their contents,
    /// and may replace placeholders in them (AWS).
    pub contains_secret: bool,
}

/// A long-running process, supervised by rigger (local provider) or systemd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceSpec {
    /// Unique on the server: `nginx`, `gunicorn`, `postgresql`, ...
    pub name: String,
    /// Runs in the foreground: it never daemonizes, so the supervisor's child is the service.
    /// Its `user` is `None`: the service's user is [`ServiceSpec::user`].
    pub command: Command,
    /// User the process starts as (a master process that binds ports < 1024 runs as `root`
    /// and drops privileges itself).
    pub user: String,
    /// A file of `KEY=value` lines (systemd's `EnvironmentFile` syntax, see
    /// [`crate::envfile`]) whose variables are added to the process environment, and to the
    /// environment of a [`Probe::Command`] of this service. This is how secrets reach the app.
    pub env_file: Option<PathBuf>,
    /// Names of services on the same server that must be ready before this one starts.
    pub depends_on: Vec<String>,
    /// How the supervisor knows the service is ready; retried until it succeeds or the
    /// provider's start timeout passes.
    pub readiness: Probe,
    /// Signal that asks for a graceful stop; after `stop_timeout` the supervisor sends SIGKILL.
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    /// Signal that makes the service re-read its configuration, when it has one.
    pub reload_signal: Option<Signal>,
    /// Where a supervisor without a journal (the local provider) appends the process's
    /// stdout and stderr. systemd ignores it: output goes to the journal.
    pub log_file: PathBuf,
}

/// One-shot command, run only when needed: skipped when `creates` exists; without `creates`
/// it runs at every apply and must itself be idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepSpec {
    /// Unique on the server, e.g. `postgresql-initdb`.
    pub name: String,
    pub command: Command,
    pub phase: Phase,
    /// Skip the step when this path exists (the step's product).
    pub creates: Option<PathBuf>,
    /// File connected to the command's standard input.
    pub stdin_file: Option<PathBuf>,
    /// Set when the step needs a peer on another server that may not be ready yet (a
    /// replica's base backup needs the primary up and set up). A provider that starts
    /// servers in dependency order (local) runs it once; one whose servers boot together
    /// and run their script once (AWS user-data) retries it, see [`Retry`].
    pub retry: Option<Retry>,
}

/// How a provider whose servers boot together retries a step that waits for a peer: until it
/// succeeds, with pauses that grow, for `within` at most, then it fails saying so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Retry {
    pub within: Duration,
    /// A directory the step fills, emptied after each failed attempt, so a half-made copy is
    /// never mistaken for a whole one (or refused as "not empty") by the next attempt.
    pub clean: Option<PathBuf>,
}

/// How long a step retried for a peer ([`Retry`]) may wait: servers launched together reach
/// "ready" within minutes of each other (the slowest, a database installing its packages on
/// a stock image, in about one); 15 minutes covers a slow archive mirror or a busy region
/// without leaving a server that can never succeed waiting for long.
pub const PEER_WAIT: Duration = Duration::from_secs(15 * 60);

/// When a step runs relative to the recipe's services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// After files are written, before any service of the server starts.
    BeforeStart,
    /// Once every service of the server is ready.
    AfterStart,
}

/// A readiness check, executed by the provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Probe {
    /// A TCP connection is accepted.
    Tcp { addr: Ipv4Addr, port: u16 },
    /// A TLS handshake succeeds and the certificate chains to `ca_file` and is valid for
    /// `server_name`.
    Tls {
        addr: Ipv4Addr,
        port: u16,
        server_name: String,
        ca_file: PathBuf,
    },
    /// `GET https://addr:port{path}` with `Host: host`, certificate checked as for `Tls`,
    /// answers `expect_status`.
    Https {
        addr: Ipv4Addr,
        port: u16,
        server_name: String,
        ca_file: PathBuf,
        host: String,
        path: String,
        expect_status: u16,
    },
    /// The command exits 0. It runs with the service's `env_file` loaded.
    Command(Command),
    /// The process has been started and has not exited: for services that offer nothing to
    /// probe and that nothing depends on (Celery beat).
    Running,
}

/// The signals a recipe uses to stop or reload a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Signal {
    Term,
    Int,
    Quit,
    Hup,
    Usr1,
    Usr2,
}

impl Signal {
    /// The name without `SIG`, as `kill -s` and systemd's `KillSignal=SIG...` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Term => "TERM",
            Signal::Int => "INT",
            Signal::Quit => "QUIT",
            Signal::Hup => "HUP",
            Signal::Usr1 => "USR1",
            Signal::Usr2 => "USR2",
        }
    }

    /// The Linux signal number.
    pub fn number(self) -> i32 {
        match self {
            Signal::Hup => 1,
            Signal::Int => 2,
            Signal::Quit => 3,
            Signal::Usr1 => 10,
            Signal::Usr2 => 12,
            Signal::Term => 15,
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIG{}", self.name())
    }
}

impl Recipe {
    /// Adds `other`'s items. An item already present under the same key (directory or file
    /// path, service or step name) must be identical: two roles of one server share
    /// PgBouncer, say, but must never disagree about it.
    pub fn merge(&mut self, other: Recipe) -> Result<(), RenderError> {
        merge_by(&mut self.dirs, other.dirs, |d| d.path.display().to_string())?;
        merge_by(&mut self.files, other.files, |f| {
            f.path.display().to_string()
        })?;
        merge_by(&mut self.services, other.services, |s| s.name.clone())?;
        merge_by(&mut self.steps, other.steps, |s| s.name.clone())?;
        Ok(())
    }

    /// Every command of the recipe: services', command probes' and steps'.
    pub fn commands(&self) -> impl Iterator<Item = &Command> {
        let services = self.services.iter().flat_map(|s| {
            let probe = match &s.readiness {
                Probe::Command(c) => Some(c),
                _ => None,
            };
            std::iter::once(&s.command).chain(probe)
        });
        services.chain(self.steps.iter().map(|s| &s.command))
    }

    pub fn file(&self, path: impl AsRef<std::path::Path>) -> Option<&FileSpec> {
        self.files.iter().find(|f| f.path == path.as_ref())
    }

    pub fn service(&self, name: &str) -> Option<&ServiceSpec> {
        self.services.iter().find(|s| s.name == name)
    }

    pub fn step(&self, name: &str) -> Option<&StepSpec> {
        self.steps.iter().find(|s| s.name == name)
    }
}

fn merge_by<T: PartialEq>(
    into: &mut Vec<T>,
    from: Vec<T>,
    key: impl Fn(&T) -> String,
) -> Result<(), RenderError> {
    for item in from {
        let k = key(&item);
        match into.iter().find(|existing| key(existing) == k) {
            Some(existing) if *existing == item => {}
            Some(_) => return Err(RenderError::Conflict { key: k }),
            None => into.push(item),
        }
    }
    Ok(())
}

/// A review-friendly listing of the recipe (file contents excepted), used by snapshot tests
/// and by `rigger plan`-style output. Secrets never appear: commands hold none, and file
/// contents are not shown.
impl fmt::Display for Recipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "dirs:")?;
        for d in &self.dirs {
            writeln!(f, "  {} {:04o} {}", d.path.display(), d.mode, d.owner)?;
        }
        writeln!(f, "files:")?;
        for file in &self.files {
            let secret = if file.contains_secret { " secret" } else { "" };
            writeln!(
                f,
                "  {} {:04o} {}{secret}",
                file.path.display(),
                file.mode,
                file.owner
            )?;
        }
        writeln!(f, "services:")?;
        for s in &self.services {
            writeln!(f, "  {} (user {})", s.name, s.user)?;
            write_command(f, "    ", &s.command)?;
            if let Some(env_file) = &s.env_file {
                writeln!(f, "    env_file: {}", env_file.display())?;
            }
            if !s.depends_on.is_empty() {
                writeln!(f, "    depends_on: {}", s.depends_on.join(", "))?;
            }
            writeln!(f, "    ready: {}", s.readiness)?;
            write!(
                f,
                "    stop: {} then SIGKILL after {}s",
                s.stop_signal,
                s.stop_timeout.as_secs()
            )?;
            match s.reload_signal {
                Some(sig) => writeln!(f, "; reload: {sig}")?,
                None => writeln!(f)?,
            }
            writeln!(f, "    log: {}", s.log_file.display())?;
        }
        writeln!(f, "steps:")?;
        for s in &self.steps {
            let phase = match s.phase {
                Phase::BeforeStart => "before start",
                Phase::AfterStart => "after start",
            };
            writeln!(f, "  {} ({phase})", s.name)?;
            write_command(f, "    ", &s.command)?;
            if let Some(creates) = &s.creates {
                writeln!(f, "    creates: {}", creates.display())?;
            }
            if let Some(stdin) = &s.stdin_file {
                writeln!(f, "    stdin: {}", stdin.display())?;
            }
            if let Some(retry) = &s.retry {
                write!(
                    f,
                    "    retried for a peer: up to {}s",
                    retry.within.as_secs()
                )?;
                match &retry.clean {
                    Some(dir) => writeln!(f, ", emptying {} after a failure", dir.display())?,
                    None => writeln!(f)?,
                }
            }
        }
        Ok(())
    }
}

fn write_command(f: &mut fmt::Formatter<'_>, indent: &str, c: &Command) -> fmt::Result {
    let mut context = Vec::new();
    if let Some(user) = &c.user {
        context.push(format!("as {user}"));
    }
    if let Some(cwd) = &c.cwd {
        context.push(format!("in {}", cwd.display()));
    }
    if !context.is_empty() {
        writeln!(f, "{indent}({})", context.join(", "))?;
    }
    writeln!(f, "{indent}$ {c}")
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Tcp { addr, port } => write!(f, "tcp {addr}:{port}"),
            Probe::Tls {
                addr,
                port,
                server_name,
                ca_file,
            } => write!(
                f,
                "tls {addr}:{port} as {server_name} (CA {})",
                ca_file.display()
            ),
            Probe::Https {
                addr,
                port,
                server_name,
                ca_file,
                host,
                path,
                expect_status,
            } => write!(
                f,
                "GET https://{addr}:{port}{path} Host {host} -> {expect_status} (cert {server_name}, CA {})",
                ca_file.display()
            ),
            Probe::Command(c) => match &c.user {
                Some(user) => write!(f, "(as {user}) $ {c}"),
                None => write!(f, "$ {c}"),
            },
            Probe::Running => f.write_str("process running"),
        }
    }
}
