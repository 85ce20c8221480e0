//! [`SshTransport`]: a server reached with the system OpenSSH client, one multiplexed
//! connection per server.
//!
//! The first use of a server starts a master connection in the background (`ControlMaster`,
//! `ControlPersist`, its socket in a per-environment directory of mode 0700); every command
//! after it is a new session on that connection, so a command costs one process and a round
//! trip instead of a key exchange. Servers behind a bastion are reached through it
//! (`ProxyCommand ssh -W`), over the bastion's own multiplexed connection.
//!
//! Host keys are checked against a per-environment `known_hosts` file, never ignored: a
//! server rigger created may record its key on first contact (`StrictHostKeyChecking
//! accept-new`); once recorded (or for a server rigger did not create) the key must match
//! (`yes`). A changed key is refused with a message saying how to forget the old one if the
//! server was really rebuilt. Start at [`SshTransport::new`]; [`SshTransport::ssh_args`] is
//! the pure part, tested by comparing text.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rigger_recipes::shell_quote;

use crate::{BoxFuture, ExitStatus, Job, OutputSink, Transport, TransportError, wrap};

/// Where the OpenSSH client is.
pub const SSH: &str = "ssh";

/// `ssh` appends up to this many characters to a control socket's path while creating it.
const CONTROL_SUFFIX: usize = 17;
/// The longest path of a Unix socket (`sun_path`, with its NUL).
const SUN_PATH: usize = 108;

/// How to reach one server over SSH: what a provider supplies.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SshTarget {
    /// Address or name (the public address, or the private one behind a bastion).
    pub host: String,
    pub port: u16,
    /// The user to log in as (the deploy user).
    pub user: String,
    /// The private key (a relative path is taken from the current directory); `None` lets
    /// `ssh` use the agent and its default keys.
    pub identity_file: Option<PathBuf>,
    /// The jump host this server is reached through.
    pub bastion: Option<Box<SshTarget>>,
    /// rigger created this server, so the first host key it shows is recorded rather than
    /// refused. Keys already recorded are always enforced.
    pub trust_first_key: bool,
}

impl SshTarget {
    /// `user@host` on port 22, no identity file, no bastion, key not trusted on first sight.
    pub fn new(host: impl Into<String>, user: impl Into<String>) -> SshTarget {
        SshTarget {
            host: host.into(),
            port: 22,
            user: user.into(),
            identity_file: None,
            bastion: None,
            trust_first_key: false,
        }
    }

    /// The name of this host in `known_hosts`: `host`, or `[host]:port` off port 22.
    pub fn known_hosts_name(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("[{}]:{}", self.host, self.port)
        }
    }

    /// `user@host:port`, and the bastion's after `via`.
    pub fn address(&self) -> String {
        let own = format!("{}@{}:{}", self.user, self.host, self.port);
        match &self.bastion {
            Some(bastion) => format!("{own} via {}", bastion.address()),
            None => own,
        }
    }
}

/// What every SSH connection of an environment shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshSettings {
    /// The environment's `known_hosts` (rigger's own, not the user's).
    pub known_hosts: PathBuf,
    /// Where control sockets live: mode 0700, short enough for a socket path.
    pub control_dir: PathBuf,
    /// How long to wait for a connection (`ConnectTimeout`).
    pub connect_timeout: Duration,
    /// How long a master connection outlives its last command (`ControlPersist`), so the next
    /// rigger command reuses it.
    pub persist: Duration,
    /// A rigger command that forgets a server's recorded key, completed by the server's name
    /// (`rigger ssh -e prod --forget-host-key`); told when a key changed.
    pub forget_hint: Option<String>,
}

impl SshSettings {
    /// Settings with the given files, a 10 s connect timeout and 60 s persistence.
    pub fn new(known_hosts: impl Into<PathBuf>, control_dir: impl Into<PathBuf>) -> SshSettings {
        SshSettings {
            known_hosts: known_hosts.into(),
            control_dir: control_dir.into(),
            connect_timeout: Duration::from_secs(10),
            persist: Duration::from_secs(60),
            forget_hint: None,
        }
    }

    /// Creates the control directory (mode 0700, refusing one that someone else owns or
    /// others can enter) and the known_hosts file's directory, and checks that socket paths
    /// fit.
    pub fn prepare(&self) -> Result<(), SetupError> {
        let longest = self.control_dir.as_os_str().len() + 1 + 16 + CONTROL_SUFFIX;
        if longest >= SUN_PATH {
            return Err(SetupError::ControlDirTooLong {
                dir: self.control_dir.clone(),
            });
        }
        for dir in [
            Some(self.control_dir.as_path()),
            self.known_hosts
                .parent()
                .filter(|p| !p.as_os_str().is_empty()),
        ]
        .into_iter()
        .flatten()
        {
            private_dir(dir)?;
        }
        Ok(())
    }
}

/// Why the SSH directories could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "the SSH control directory {} is too long for a socket path; use a shorter state directory (RIGGER_STATE_DIR)",
        dir.display()
    )]
    ControlDirTooLong { dir: PathBuf },
    #[error("creating the private directory {}", dir.display())]
    Create {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} belongs to uid {owner}, not to rigger's user; remove it (it only holds SSH control sockets) and retry",
        dir.display()
    )]
    NotOwned { dir: PathBuf, owner: u32 },
}

/// One server reached over SSH.
#[derive(Debug)]
pub struct SshTransport {
    server: String,
    target: SshTarget,
    settings: Arc<SshSettings>,
    connected: tokio::sync::Mutex<bool>,
}

/// Whether a command may prompt (a passphrase, a password) or must fail instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Batch,
    Interactive,
}

impl SshTransport {
    /// The server named `server` (`web-1`) at `target`. Call [`SshSettings::prepare`] once
    /// before using any transport.
    pub fn new(server: impl Into<String>, target: SshTarget, settings: Arc<SshSettings>) -> Self {
        SshTransport {
            server: server.into(),
            target: absolute_identities(target),
            settings,
            connected: tokio::sync::Mutex::new(false),
        }
    }

    pub fn target(&self) -> &SshTarget {
        &self.target
    }

    /// Every option and argument of `ssh` up to and including the host: no configuration file
    /// but these options, rigger's known_hosts, host key checking as described in the module
    /// documentation, multiplexing, and the bastion when there is one.
    pub fn ssh_args(&self, mode: Mode) -> Vec<String> {
        target_args(&self.target, &self.settings, mode)
    }

    /// The path of this server's control socket.
    pub fn control_path(&self) -> PathBuf {
        control_path(&self.target, &self.settings)
    }

    /// Asks this server's master connection to exit (it would after
    /// [`SshSettings::persist`] anyway).
    pub async fn disconnect(&self) {
        let _ = tokio::process::Command::new(SSH)
            .args(control_args(&self.target, &self.settings, "exit"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        *self.connected.lock().await = false;
    }

    /// Removes this server's recorded host key from rigger's known_hosts (after the server
    /// was rebuilt) and closes its master connection. Returns whether a key was removed.
    pub async fn forget_host_key(&self) -> Result<bool, TransportError> {
        self.disconnect().await;
        let name = self.target.known_hosts_name();
        if !is_known(&self.settings.known_hosts, &name) {
            return Ok(false);
        }
        let output = tokio::process::Command::new("ssh-keygen")
            .arg("-R")
            .arg(&name)
            .arg("-f")
            .arg(&self.settings.known_hosts)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|source| TransportError::Spawn {
                server: self.server.clone(),
                program: "ssh-keygen".into(),
                source,
            })?;
        if !output.status.success() {
            return Err(TransportError::Io {
                server: self.server.clone(),
                what: format!(
                    "removing {name} from {}: {}",
                    self.settings.known_hosts.display(),
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
                source: std::io::Error::other("ssh-keygen -R failed"),
            });
        }
        // ssh-keygen keeps the old file as known_hosts.old; the key is forgotten on purpose.
        let _ = std::fs::remove_file(self.settings.known_hosts.with_extension("old"));
        Ok(true)
    }

    async fn ensure_connected(&self) -> Result<(), TransportError> {
        let mut connected = self.connected.lock().await;
        if *connected {
            return Ok(());
        }
        // A master left by an earlier rigger command (ControlPersist) answers on its socket:
        // reuse it without starting a process.
        if master_listening(&self.control_path()).await {
            *connected = true;
            return Ok(());
        }
        if let Some(bastion) = &self.target.bastion {
            // One connection to the bastion serves every server behind it; start it before
            // the servers' ProxyCommands look for it, one starter at a time.
            let lock = master_lock(&control_path(bastion, &self.settings));
            let _guard = lock.lock().await;
            if !master_listening(&control_path(bastion, &self.settings)).await {
                start_master(&self.server, bastion, &self.settings, "its bastion ").await?;
            }
        }
        start_master(&self.server, &self.target, &self.settings, "").await?;
        *connected = true;
        Ok(())
    }

    /// Runs `line` in a new session; `stdin` is the session's standard input.
    async fn session(
        &self,
        line: &str,
        stdin: Stdio,
        output: &dyn OutputSink,
    ) -> Result<ExitStatus, TransportError> {
        self.ensure_connected().await?;
        let mut process = tokio::process::Command::new(SSH);
        process
            .args(self.ssh_args(Mode::Batch))
            .arg("-T")
            .arg("--")
            .arg(line)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = process.spawn().map_err(|source| TransportError::Spawn {
            server: self.server.clone(),
            program: SSH.into(),
            source,
        })?;
        let (status, stderr) = crate::stream::pump(&mut child, output)
            .await
            .map_err(|source| TransportError::Io {
                server: self.server.clone(),
                what: "reading the output of ssh".into(),
                source,
            })?;
        let status = ExitStatus::from_std(status);
        // 255 is ssh's own failure, or the command's code: the master tells them apart.
        if status == ExitStatus::Code(255) && !self.master_alive().await {
            *self.connected.lock().await = false;
            return Err(
                match failure(&self.server, &self.target, &self.settings, &stderr) {
                    TransportError::Unreachable {
                        server,
                        address,
                        reason,
                    } => TransportError::ConnectionLost {
                        server,
                        address,
                        reason,
                    },
                    other => other,
                },
            );
        }
        Ok(status)
    }

    async fn master_alive(&self) -> bool {
        tokio::process::Command::new(SSH)
            .args(control_args(&self.target, &self.settings, "check"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|status| status.success())
    }
}

impl Transport for SshTransport {
    fn server(&self) -> &str {
        &self.server
    }

    fn describe(&self) -> String {
        format!("ssh {}", self.target.address())
    }

    fn connect(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(self.ensure_connected())
    }

    fn run<'a>(
        &'a self,
        job: &'a Job,
        output: &'a dyn OutputSink,
    ) -> BoxFuture<'a, Result<ExitStatus, TransportError>> {
        Box::pin(async move {
            let line = wrap::remote_line(job, &self.target.user);
            self.session(&line, Stdio::null(), output).await
        })
    }

    fn copy_file<'a>(
        &'a self,
        source: &'a Path,
        destination: &'a Path,
        mode: u32,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let copy_error = |reason: String| TransportError::Copy {
                server: self.server.clone(),
                source_path: source.to_path_buf(),
                destination: destination.to_path_buf(),
                reason,
            };
            let file = std::fs::File::open(source).map_err(|e| copy_error(e.to_string()))?;
            let stderr = Mutex::new(Vec::new());
            let keep = |_: crate::Stream, line: &str| {
                stderr.lock().expect("not poisoned").push(line.to_owned());
            };
            let status = self
                .session(
                    &wrap::copy_line(destination, mode),
                    Stdio::from(file),
                    &keep,
                )
                .await?;
            if status.success() {
                Ok(())
            } else {
                let lines = stderr.into_inner().expect("not poisoned");
                Err(copy_error(format!("{status}: {}", lines.join("; "))))
            }
        })
    }

    fn interactive(&self, job: Option<&Job>, tty: bool) -> std::process::Command {
        let mut process = std::process::Command::new(SSH);
        process.args(self.ssh_args(Mode::Interactive));
        process.arg(if tty { "-t" } else { "-T" });
        if let Some(job) = job {
            process
                .arg("--")
                .arg(wrap::remote_line(job, &self.target.user));
        }
        process
    }
}

/// The arguments of `ssh` that reach `target`.
fn target_args(target: &SshTarget, settings: &SshSettings, mode: Mode) -> Vec<String> {
    let known = is_known(&settings.known_hosts, &target.known_hosts_name());
    let checking = if !known && target.trust_first_key {
        "accept-new"
    } else {
        "yes"
    };
    let mut options: Vec<(&str, String)> = Vec::new();
    if mode == Mode::Batch {
        options.push(("BatchMode", "yes".into()));
    }
    options.extend([
        (
            "ConnectTimeout",
            settings.connect_timeout.as_secs().max(1).to_string(),
        ),
        ("ServerAliveInterval", "15".into()),
        ("ServerAliveCountMax", "4".into()),
        (
            "UserKnownHostsFile",
            percent_escape(&settings.known_hosts.display().to_string()),
        ),
        ("GlobalKnownHostsFile", "/dev/null".into()),
        ("StrictHostKeyChecking", checking.into()),
        ("HashKnownHosts", "no".into()),
        ("CheckHostIP", "no".into()),
        ("UpdateHostKeys", "no".into()),
        ("ControlMaster", "auto".into()),
        (
            "ControlPath",
            percent_escape(&control_path(target, settings).display().to_string()),
        ),
        (
            "ControlPersist",
            format!("{}s", settings.persist.as_secs().max(1)),
        ),
        ("LogLevel", "ERROR".into()),
    ]);
    if let Some(identity) = &target.identity_file {
        options.push(("IdentitiesOnly", "yes".into()));
        options.push((
            "IdentityFile",
            percent_escape(&identity.display().to_string()),
        ));
    }
    if let Some(bastion) = &target.bastion {
        options.push(("ProxyCommand", proxy_command(bastion, settings)));
    }
    let mut args = vec!["-F".to_owned(), "/dev/null".to_owned()];
    for (key, value) in options {
        args.push("-o".into());
        args.push(format!("{key}={value}"));
    }
    args.extend([
        "-p".into(),
        target.port.to_string(),
        "-l".into(),
        target.user.clone(),
        target.host.clone(),
    ]);
    args
}

/// `ssh ... -W [%h]:%p bastion`: a shell line, with `%` doubled where ssh must not expand it.
fn proxy_command(bastion: &SshTarget, settings: &SshSettings) -> String {
    let mut words = vec![SSH.to_owned()];
    words.extend(
        target_args(bastion, settings, Mode::Batch)
            .iter()
            .map(|word| percent_escape(word)),
    );
    let host = words.pop().expect("the host is the last argument");
    words.extend(["-W".to_owned(), "[%h]:%p".to_owned(), host]);
    words
        .iter()
        .map(|word| shell_quote(word))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `ssh -O COMMAND` for `target`'s master connection.
fn control_args(target: &SshTarget, settings: &SshSettings, command: &str) -> Vec<String> {
    vec![
        "-F".into(),
        "/dev/null".into(),
        "-o".into(),
        format!(
            "ControlPath={}",
            percent_escape(&control_path(target, settings).display().to_string())
        ),
        "-O".into(),
        command.into(),
        "-p".into(),
        target.port.to_string(),
        "-l".into(),
        target.user.clone(),
        target.host.clone(),
    ]
}

/// `<control_dir>/<16 hex digits>`: a hash of everything that makes a connection different,
/// short enough for a socket path whatever the host's name.
fn control_path(target: &SshTarget, settings: &SshSettings) -> PathBuf {
    let key = format!(
        "{}|{}",
        target.address(),
        target
            .identity_file
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    settings
        .control_dir
        .join(format!("{:016x}", fnv1a(key.as_bytes())))
}

/// `target` with its identity files (and its bastion's) made absolute: ssh would look for a
/// relative one in the home directory, not the current one.
fn absolute_identities(mut target: SshTarget) -> SshTarget {
    if let Some(file) = target.identity_file.take() {
        target.identity_file = Some(std::path::absolute(&file).unwrap_or(file));
    }
    target.bastion = target
        .bastion
        .map(|bastion| Box::new(absolute_identities(*bastion)));
    target
}

/// Whether a master connection listens on `socket` (a connection to it is accepted).
async fn master_listening(socket: &Path) -> bool {
    tokio::net::UnixStream::connect(socket).await.is_ok()
}

/// Starts `target`'s master connection in the background (or finds it running) and checks
/// its host key; `what` names it in errors ("its bastion ").
async fn start_master(
    server: &str,
    target: &SshTarget,
    settings: &SshSettings,
    what: &str,
) -> Result<(), TransportError> {
    // With -f, ssh goes to the background once logged in; its stderr goes to a file, since the
    // background master would hold a pipe open.
    let log = tempfile_in(&settings.control_dir).map_err(|source| TransportError::Io {
        server: server.into(),
        what: format!("creating a file in {}", settings.control_dir.display()),
        source,
    })?;
    let status = tokio::process::Command::new(SSH)
        .args(target_args(target, settings, Mode::Batch))
        .args(["-N", "-f"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log.1.try_clone().map_err(|source| {
            TransportError::Io {
                server: server.into(),
                what: "duplicating a file descriptor".into(),
                source,
            }
        })?))
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|source| TransportError::Spawn {
            server: server.into(),
            program: SSH.into(),
            source,
        })?;
    let stderr = std::fs::read_to_string(&log.0).unwrap_or_default();
    let _ = std::fs::remove_file(&log.0);
    if status.success() {
        return Ok(());
    }
    let lines: Vec<String> = stderr.lines().map(str::to_owned).collect();
    let mut error = failure(server, target, settings, &lines);
    if !what.is_empty()
        && let TransportError::Unreachable { reason, .. } = &mut error
    {
        *reason = format!("{what}{}: {reason}", target.address());
    }
    Err(error)
}

/// What went wrong, from ssh's error lines (it exited 255).
fn failure(
    server: &str,
    target: &SshTarget,
    settings: &SshSettings,
    stderr: &[String],
) -> TransportError {
    let text = stderr.join("\n");
    let address = target.address();
    if text.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || text.contains("Host key for") && text.contains("has changed")
    {
        let name = target.known_hosts_name();
        let keygen = format!(
            "ssh-keygen -R {} -f {}",
            shell_quote(&name),
            shell_quote(&settings.known_hosts.display().to_string())
        );
        let fix = match &settings.forget_hint {
            Some(hint) => format!("`{hint} {server}` (or `{keygen}`)"),
            None => format!("`{keygen}`"),
        };
        return TransportError::HostKeyChanged {
            server: server.into(),
            address,
            known_hosts: settings.known_hosts.clone(),
            fix,
        };
    }
    if text.contains("host key is known") && text.contains("strict checking") {
        return TransportError::HostKeyUnknown {
            server: server.into(),
            address,
            known_hosts: settings.known_hosts.clone(),
        };
    }
    if let Some(line) = stderr.iter().find(|l| l.contains("Permission denied")) {
        return TransportError::AuthenticationFailed {
            server: server.into(),
            address,
            user: target.user.clone(),
            reason: line.trim().to_owned(),
        };
    }
    let reason = stderr
        .iter()
        .rev()
        .map(|line| line.trim())
        .find(|line| !line.is_empty())
        .map_or_else(
            || "ssh exited with status 255 and said nothing".to_owned(),
            |line| line.strip_prefix("ssh: ").unwrap_or(line).to_owned(),
        );
    TransportError::Unreachable {
        server: server.into(),
        address,
        reason,
    }
}

/// Whether `known_hosts` has a key for `name` (a plain entry: rigger writes them unhashed).
/// A hashed entry is not seen here, but ssh itself still enforces it.
pub fn is_known(known_hosts: &Path, name: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(known_hosts) else {
        return false;
    };
    text.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#') && !line.starts_with('@'))
        .filter_map(|line| line.split_whitespace().next())
        .any(|hosts| hosts.split(',').any(|host| host == name))
}

/// Doubles `%`, which ssh would otherwise expand as a token in paths and commands.
fn percent_escape(text: &str) -> String {
    text.replace('%', "%%")
}

/// A per-socket-path lock, so that one rigger process starts each master connection once.
fn master_lock(path: &Path) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Mutex::default)
        .lock()
        .expect("not poisoned");
    Arc::clone(locks.entry(path.to_path_buf()).or_default())
}

/// A new private file in `dir`, for ssh's error output.
fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt as _;
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    loop {
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("ssh-{}-{n}.err", std::process::id()));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Creates `dir` with mode 0700, or makes an existing one of ours 0700.
fn private_dir(dir: &Path) -> Result<(), SetupError> {
    let create = |source| SetupError::Create {
        dir: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(create)?;
    let metadata = std::fs::symlink_metadata(dir).map_err(create)?;
    let uid = nix::unistd::geteuid().as_raw();
    if metadata.uid() != uid || !metadata.is_dir() {
        return Err(SetupError::NotOwned {
            dir: dir.to_path_buf(),
            owner: metadata.uid(),
        });
    }
    if metadata.permissions().mode() & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(create)?;
    }
    Ok(())
}

/// 64-bit FNV-1a: names control sockets; not a security boundary.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> Arc<SshSettings> {
        let mut settings = SshSettings::new(dir.join("known_hosts"), "/run/rigger/cm");
        settings.forget_hint = Some("rigger ssh -e prod --forget-host-key".into());
        Arc::new(settings)
    }

    fn target() -> SshTarget {
        SshTarget {
            identity_file: Some("/etc/rigger/deploy_key".into()),
            trust_first_key: true,
            ..SshTarget::new("203.0.113.7", "admin")
        }
    }

    fn args(transport: &SshTransport, mode: Mode) -> String {
        transport
            .ssh_args(mode)
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn first_contact_to_a_server_rigger_created_records_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let transport = SshTransport::new("web-1", target(), settings(dir.path()));
        let control = transport.control_path().display().to_string();
        assert_eq!(
            args(&transport, Mode::Batch),
            format!(
                "-F /dev/null -o BatchMode=yes -o ConnectTimeout=10 -o ServerAliveInterval=15 \
                 -o ServerAliveCountMax=4 -o UserKnownHostsFile={kh} \
                 -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=accept-new \
                 -o HashKnownHosts=no -o CheckHostIP=no -o UpdateHostKeys=no \
                 -o ControlMaster=auto -o ControlPath={control} -o ControlPersist=60s \
                 -o LogLevel=ERROR -o IdentitiesOnly=yes \
                 -o IdentityFile=/etc/rigger/deploy_key -p 22 -l admin 203.0.113.7",
                kh = dir.path().join("known_hosts").display()
            )
        );
        assert!(control.starts_with("/run/rigger/cm/"), "{control}");
    }

    #[test]
    fn a_recorded_key_is_always_enforced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("known_hosts"),
            "[203.0.113.7]:2222 ssh-ed25519 AAAA\n203.0.113.7 ssh-ed25519 AAAA\n",
        )
        .unwrap();
        let transport = SshTransport::new("web-1", target(), settings(dir.path()));
        assert!(args(&transport, Mode::Batch).contains("StrictHostKeyChecking=yes"));
    }

    #[test]
    fn a_server_rigger_did_not_create_needs_a_recorded_key() {
        let dir = tempfile::tempdir().unwrap();
        let target = SshTarget {
            trust_first_key: false,
            ..target()
        };
        let transport = SshTransport::new("web-1", target, settings(dir.path()));
        assert!(args(&transport, Mode::Batch).contains("StrictHostKeyChecking=yes"));
    }

    #[test]
    fn interactive_sessions_may_prompt() {
        let dir = tempfile::tempdir().unwrap();
        let transport = SshTransport::new("web-1", target(), settings(dir.path()));
        assert!(!args(&transport, Mode::Interactive).contains("BatchMode"));
    }

    #[test]
    fn a_bastion_is_a_proxy_command_over_its_own_connection() {
        let dir = tempfile::tempdir().unwrap();
        let target = SshTarget {
            host: "10.0.1.5".into(),
            bastion: Some(Box::new(SshTarget {
                host: "bastion.example.com".into(),
                port: 2222,
                ..target()
            })),
            ..target()
        };
        let transport = SshTransport::new("web-1", target, settings(dir.path()));
        let args = transport.ssh_args(Mode::Batch);
        let proxy = args
            .iter()
            .find_map(|a| a.strip_prefix("ProxyCommand="))
            .unwrap();
        assert!(
            proxy.starts_with("ssh -F /dev/null -o BatchMode=yes"),
            "{proxy}"
        );
        assert!(
            proxy.ends_with("-p 2222 -l admin -W '[%h]:%p' bastion.example.com"),
            "{proxy}"
        );
        assert!(
            proxy.contains("StrictHostKeyChecking=accept-new"),
            "{proxy}"
        );
        assert_eq!(args.last().unwrap(), "10.0.1.5");
    }

    #[test]
    fn percent_signs_in_paths_are_not_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = SshSettings::new(dir.path().join("100%/known_hosts"), "/tmp/cm");
        settings.persist = Duration::from_secs(5);
        let transport = SshTransport::new("web-1", target(), Arc::new(settings));
        let args = args(&transport, Mode::Batch);
        assert!(args.contains("100%%/known_hosts"), "{args}");
        assert!(args.contains("ControlPersist=5s"), "{args}");
    }

    #[test]
    fn a_changed_host_key_says_how_to_forget_it() {
        let dir = tempfile::tempdir().unwrap();
        let settings = settings(dir.path());
        let stderr = [
            "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@",
            "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @",
            "Host key verification failed.",
        ]
        .map(String::from);
        let error = failure("web-1", &target(), &settings, &stderr);
        assert!(matches!(error, TransportError::HostKeyChanged { .. }));
        let message = error.to_string();
        assert!(
            message.contains(&format!(
                "`rigger ssh -e prod --forget-host-key web-1` (or `ssh-keygen -R 203.0.113.7 -f {}`)",
                dir.path().join("known_hosts").display()
            )),
            "{message}"
        );
    }

    #[test]
    fn failures_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let settings = settings(dir.path());
        let check = |line: &str| failure("web-1", &target(), &settings, &[line.to_owned()]);
        assert!(matches!(
            check(
                "No ED25519 host key is known for 203.0.113.7 and you have requested strict checking."
            ),
            TransportError::HostKeyUnknown { .. }
        ));
        assert!(matches!(
            check("admin@203.0.113.7: Permission denied (publickey)."),
            TransportError::AuthenticationFailed { .. }
        ));
        assert_eq!(
            check("ssh: connect to host 203.0.113.7 port 22: Connection refused").to_string(),
            "cannot reach web-1 (admin@203.0.113.7:22): connect to host 203.0.113.7 port 22: Connection refused"
        );
    }

    #[test]
    fn a_relative_identity_file_is_taken_from_the_current_directory() {
        let dir = tempfile::tempdir().unwrap();
        let target = SshTarget {
            identity_file: Some("keys/deploy".into()),
            bastion: Some(Box::new(SshTarget {
                identity_file: Some("keys/bastion".into()),
                ..SshTarget::new("b", "u")
            })),
            ..SshTarget::new("h", "u")
        };
        let transport = SshTransport::new("web-1", target, settings(dir.path()));
        let cwd = std::env::current_dir().unwrap();
        let target = transport.target();
        assert_eq!(target.identity_file, Some(cwd.join("keys/deploy")));
        assert_eq!(
            target.bastion.as_ref().unwrap().identity_file,
            Some(cwd.join("keys/bastion"))
        );
    }

    #[test]
    fn known_hosts_names_carry_the_port_off_22() {
        let target = SshTarget {
            port: 2222,
            ..SshTarget::new("127.90.0.1", "root")
        };
        assert_eq!(target.known_hosts_name(), "[127.90.0.1]:2222");
        assert_eq!(SshTarget::new("h", "u").known_hosts_name(), "h");
    }

    #[test]
    fn prepare_refuses_a_control_dir_too_long_for_a_socket() {
        let settings = SshSettings::new("/tmp/kh", "/tmp/".to_owned() + &"x".repeat(80));
        assert!(matches!(
            settings.prepare(),
            Err(SetupError::ControlDirTooLong { .. })
        ));
    }
}
