//! [`SshTransport`]: a server reached with the system OpenSSH client, one multiplexed
//! connection per server.
//!
//! The first use of a server starts a master connection in the background (`ControlMaster`,
//! `ControlPersist`, its socket in a per-environment directory of mode 0700); every command
//! after it is a new session on that connection, so a command costs one process and a round
//! trip instead of a key exchange. Servers behind a bastion are reached through it
//! (`ProxyCommand ssh -W`), over the bastion's own multiplexed connection.
//!
//! Host keys are always checked (`StrictHostKeyChecking=yes`), never trusted on first use.
//! A server rigger created is checked against the keys it published itself ([`PinnedKeys`]: on
//! AWS an SSM parameter each server writes at boot with its own instance role): they are
//! written to a `known_hosts` file of that server's own, under an alias that names the server
//! (its instance id, `HostKeyAlias`), so nothing else is accepted, and an address that a new
//! server reuses is never a conflict (the new server has another alias and its own keys). A
//! host rigger did not create (a bastion) must have its key recorded in the environment's
//! `known_hosts` beforehand ([`HostKeyCheck::Recorded`]); a changed key is refused with how to
//! forget the old one. Start at [`SshTransport::new`]; [`SshTransport::ssh_args`] is the pure
//! part, tested by comparing text.

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
    /// Which host keys are accepted.
    pub host_keys: HostKeyCheck,
}

/// Which host keys a connection accepts. Either way the key must match
/// (`StrictHostKeyChecking=yes`): none is ever recorded on first sight.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostKeyCheck {
    /// Only the keys the server published (a server rigger created).
    Pinned(PinnedKeys),
    /// The key recorded in the environment's `known_hosts` by the operator, after checking
    /// its fingerprint (a host rigger did not create, such as a bastion).
    Recorded,
}

/// The host keys a server published, and the name they are kept under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PinnedKeys {
    alias: String,
    keys: Vec<HostKey>,
    source: String,
}

impl PinnedKeys {
    /// `keys` for the server named `alias` (its instance id: letters, digits, `.`, `_`, `-`),
    /// published in `source` (for messages: `SSM parameter /shop/prod/hostkeys/i-0abc`).
    pub fn new(
        alias: impl Into<String>,
        keys: Vec<HostKey>,
        source: impl Into<String>,
    ) -> Result<PinnedKeys, String> {
        let alias = alias.into();
        let valid = !alias.is_empty()
            && alias.len() <= 128
            && !alias.starts_with(['.', '-'])
            && alias
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !valid {
            return Err(format!(
                "`{}` cannot name a server's host keys: use letters, digits, `.`, `_` and `-`",
                alias.escape_debug()
            ));
        }
        if keys.is_empty() {
            return Err(format!("no host key of {alias} was published"));
        }
        Ok(PinnedKeys {
            alias,
            keys,
            source: source.into(),
        })
    }

    /// The name the keys are looked up under (`HostKeyAlias`).
    pub fn alias(&self) -> &str {
        &self.alias
    }

    pub fn keys(&self) -> &[HostKey] {
        &self.keys
    }

    /// Where the server published them.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The `known_hosts` text that accepts exactly these keys for the alias.
    pub fn known_hosts(&self) -> String {
        self.keys
            .iter()
            .map(|key| format!("{} {} {}\n", self.alias, key.algorithm, key.key))
            .collect()
    }
}

/// One public host key: `ssh-ed25519 AAAAC3Nz...`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostKey {
    algorithm: String,
    key: String,
}

/// The host key algorithms OpenSSH servers offer.
const HOST_KEY_ALGORITHMS: [&str; 7] = [
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

impl HostKey {
    /// A public key line as in `ssh_host_ed25519_key.pub` (`ALGORITHM BASE64 [COMMENT]`; the
    /// comment is dropped). Anything else is refused, so a published value can never add a
    /// line of its own to a `known_hosts` file (a `*` pattern, a `@revoked` marker).
    pub fn parse(line: &str) -> Result<HostKey, String> {
        let mut words = line.split_ascii_whitespace();
        let (Some(algorithm), Some(key)) = (words.next(), words.next()) else {
            return Err(format!(
                "`{}` is not a public key (`ALGORITHM BASE64`)",
                line.escape_debug()
            ));
        };
        if !HOST_KEY_ALGORITHMS.contains(&algorithm) {
            return Err(format!(
                "`{}` is not a host key algorithm (one of {})",
                algorithm.escape_debug(),
                HOST_KEY_ALGORITHMS.join(", ")
            ));
        }
        if !key_blob_names(key, algorithm) {
            return Err(format!(
                "the {algorithm} key `{}` is not base64 of an {algorithm} key",
                key.escape_debug()
            ));
        }
        Ok(HostKey {
            algorithm: algorithm.to_owned(),
            key: key.to_owned(),
        })
    }

    /// Every key of `text`, one a line (blank lines skipped): what a server published.
    pub fn parse_all(text: &str) -> Result<Vec<HostKey>, String> {
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(HostKey::parse)
            .collect()
    }

    pub fn algorithm(&self) -> &str {
        &self.algorithm
    }
}

/// Whether `key` is base64 whose decoded blob starts with `algorithm` as an SSH string (a
/// 4-byte big-endian length, then the name), as every public key blob does.
fn key_blob_names(key: &str, algorithm: &str) -> bool {
    let Some(blob) = base64_decode(key) else {
        return false;
    };
    let name = algorithm.as_bytes();
    blob.len() > 4 + name.len()
        && blob[..4] == u32::try_from(name.len()).unwrap_or(0).to_be_bytes()
        && &blob[4..4 + name.len()] == name
}

/// Standard base64 with padding; `None` for anything else.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes = text.as_bytes();
    if bytes.is_empty() || !bytes.len().is_multiple_of(4) {
        return None;
    }
    let padding = bytes.iter().rev().take_while(|&&c| c == b'=').count();
    if padding > 2 || bytes[..bytes.len() - padding].contains(&b'=') {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        let mut pads = 0;
        for &c in chunk {
            n <<= 6;
            if c == b'=' {
                pads += 1;
            } else if pads > 0 {
                return None;
            } else {
                n |= value(c)?;
            }
        }
        let [_, a, b, c] = n.to_be_bytes();
        out.extend_from_slice(&[a, b, c][..3 - pads]);
    }
    Some(out)
}

impl SshTarget {
    /// `user@host` on port 22, no identity file, no bastion, its key recorded beforehand.
    pub fn new(host: impl Into<String>, user: impl Into<String>) -> SshTarget {
        SshTarget {
            host: host.into(),
            port: 22,
            user: user.into(),
            identity_file: None,
            bastion: None,
            host_keys: HostKeyCheck::Recorded,
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
    /// others can enter), the known_hosts file's directory and the one of pinned keys beside
    /// it, and checks that socket paths fit.
    pub fn prepare(&self) -> Result<(), SetupError> {
        let longest = self.control_dir.as_os_str().len() + 1 + 16 + CONTROL_SUFFIX;
        if longest >= SUN_PATH {
            return Err(SetupError::ControlDirTooLong {
                dir: self.control_dir.clone(),
            });
        }
        let pinned = self.pinned_dir();
        for dir in [
            Some(self.control_dir.as_path()),
            self.known_hosts
                .parent()
                .filter(|p| !p.as_os_str().is_empty()),
            Some(pinned.as_path()),
        ]
        .into_iter()
        .flatten()
        {
            private_dir(dir)?;
        }
        Ok(())
    }

    /// Where each server's pinned keys are written for ssh: `pinned/` beside `known_hosts`.
    pub fn pinned_dir(&self) -> PathBuf {
        self.known_hosts
            .parent()
            .unwrap_or(Path::new("."))
            .join("pinned")
    }

    /// The `known_hosts` file of the server whose keys are `pinned`: `pinned/<alias>`.
    pub fn pinned_known_hosts(&self, pinned: &PinnedKeys) -> PathBuf {
        self.pinned_dir().join(pinned.alias())
    }

    /// Removes the pinned keys of every server but `keep` (aliases): those of servers that no
    /// longer run. Returns the aliases removed.
    pub fn prune_pinned(&self, keep: &[&str]) -> std::io::Result<Vec<String>> {
        let mut removed = Vec::new();
        let entries = match std::fs::read_dir(self.pinned_dir()) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(error) => return Err(error),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name.as_str()) {
                std::fs::remove_file(entry.path())?;
                removed.push(name);
            }
        }
        removed.sort();
        Ok(removed)
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
    /// was rebuilt) and closes its master connection. Returns whether a key was removed; a
    /// server with pinned keys has none recorded (its keys are the ones it publishes).
    pub async fn forget_host_key(&self) -> Result<bool, TransportError> {
        self.disconnect().await;
        if matches!(self.target.host_keys, HostKeyCheck::Pinned(_)) {
            return Ok(false);
        }
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
        // The pinned keys as ssh reads them, whether this connection starts a master or finds
        // one (an interactive session may need its own key exchange).
        for target in [Some(&self.target), self.target.bastion.as_deref()]
            .into_iter()
            .flatten()
        {
            write_pinned(&self.server, target, &self.settings)?;
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

/// Writes `target`'s pinned keys to its own known_hosts file (whole, then renamed into
/// place, mode 0600), when it has pinned keys.
fn write_pinned(
    server: &str,
    target: &SshTarget,
    settings: &SshSettings,
) -> Result<(), TransportError> {
    use std::io::Write as _;
    let HostKeyCheck::Pinned(pinned) = &target.host_keys else {
        return Ok(());
    };
    let path = settings.pinned_known_hosts(pinned);
    let io_error = |source| TransportError::Io {
        server: server.into(),
        what: format!("writing the pinned host keys {}", path.display()),
        source,
    };
    let dir = settings.pinned_dir();
    let (temporary, mut file) = tempfile_in(&dir).map_err(io_error)?;
    let written = file
        .write_all(pinned.known_hosts().as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&temporary, &path));
    if let Err(source) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(io_error(source));
    }
    Ok(())
}

/// The arguments of `ssh` that reach `target`.
fn target_args(target: &SshTarget, settings: &SshSettings, mode: Mode) -> Vec<String> {
    // Never `accept-new`: a key is pinned or recorded beforehand, or the host is refused.
    let (known_hosts, alias) = match &target.host_keys {
        HostKeyCheck::Pinned(pinned) => (
            settings.pinned_known_hosts(pinned),
            Some(pinned.alias().to_owned()),
        ),
        HostKeyCheck::Recorded => (settings.known_hosts.clone(), None),
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
            percent_escape(&known_hosts.display().to_string()),
        ),
        ("GlobalKnownHostsFile", "/dev/null".into()),
        ("StrictHostKeyChecking", "yes".into()),
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
    if let Some(alias) = alias {
        options.push(("HostKeyAlias", alias));
    }
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
    // The pinned alias too: a master connection to a server that is gone never serves the
    // new one at its address.
    let alias = match &target.host_keys {
        HostKeyCheck::Pinned(pinned) => pinned.alias(),
        HostKeyCheck::Recorded => "",
    };
    let key = format!(
        "{}|{}|{alias}",
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
    let key_refused = text.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || text.contains("Host key for") && text.contains("has changed")
        || text.contains("host key is known") && text.contains("strict checking")
        || text.contains("Host key verification failed");
    if key_refused && let HostKeyCheck::Pinned(pinned) = &target.host_keys {
        return TransportError::HostKeyNotPublished {
            server: server.into(),
            address,
            published_in: pinned.source().to_owned(),
        };
    }
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

    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIgKJC2VezGCTLU08GeruvaGyF60q4hSSIfqjAx6IhNr";
    const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBMNaf4bYL2VnrUTlcF4N4qKGgVV5rd6LvLmIAYyYoAlsvAyeSvfqDhyDrtaA/eTlxuaLlH/iyw+BooFd2FK/wGM=";

    fn pinned(alias: &str) -> PinnedKeys {
        PinnedKeys::new(
            alias,
            HostKey::parse_all(&format!("{ED25519} root@web\n\n{ECDSA}\n")).unwrap(),
            format!("SSM parameter /shop/prod/hostkeys/{alias}"),
        )
        .unwrap()
    }

    /// A server rigger created, with the keys it published.
    fn target() -> SshTarget {
        SshTarget {
            identity_file: Some("/etc/rigger/deploy_key".into()),
            host_keys: HostKeyCheck::Pinned(pinned("i-0abc")),
            ..SshTarget::new("203.0.113.7", "admin")
        }
    }

    /// A host rigger did not create: its key is recorded beforehand.
    fn recorded() -> SshTarget {
        SshTarget {
            host_keys: HostKeyCheck::Recorded,
            ..target()
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
    fn a_server_rigger_created_is_checked_against_the_keys_it_published() {
        let dir = tempfile::tempdir().unwrap();
        let transport = SshTransport::new("web-1", target(), settings(dir.path()));
        let control = transport.control_path().display().to_string();
        assert_eq!(
            args(&transport, Mode::Batch),
            format!(
                "-F /dev/null -o BatchMode=yes -o ConnectTimeout=10 -o ServerAliveInterval=15 \
                 -o ServerAliveCountMax=4 -o UserKnownHostsFile={pinned} \
                 -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes \
                 -o HashKnownHosts=no -o CheckHostIP=no -o UpdateHostKeys=no \
                 -o ControlMaster=auto -o ControlPath={control} -o ControlPersist=60s \
                 -o LogLevel=ERROR -o HostKeyAlias=i-0abc -o IdentitiesOnly=yes \
                 -o IdentityFile=/etc/rigger/deploy_key -p 22 -l admin 203.0.113.7",
                pinned = dir.path().join("pinned/i-0abc").display()
            )
        );
        assert!(control.starts_with("/run/rigger/cm/"), "{control}");
    }

    #[test]
    fn a_new_server_at_a_reused_address_gets_its_own_master_connection() {
        let dir = tempfile::tempdir().unwrap();
        let old = SshTransport::new("web-1", target(), settings(dir.path()));
        let new = SshTransport::new(
            "web-1",
            SshTarget {
                host_keys: HostKeyCheck::Pinned(pinned("i-0def")),
                ..target()
            },
            settings(dir.path()),
        );
        assert_ne!(old.control_path(), new.control_path());
    }

    #[test]
    fn pinned_keys_are_exactly_the_published_ones_under_the_alias() {
        assert_eq!(
            pinned("i-0abc").known_hosts(),
            format!("i-0abc {ED25519}\ni-0abc {ECDSA}\n")
        );
    }

    #[test]
    fn a_host_rigger_did_not_create_needs_a_recorded_key() {
        let dir = tempfile::tempdir().unwrap();
        let transport = SshTransport::new("bastion", recorded(), settings(dir.path()));
        let args = args(&transport, Mode::Batch);
        assert!(args.contains("StrictHostKeyChecking=yes"), "{args}");
        assert!(
            args.contains(&format!(
                "UserKnownHostsFile={}",
                dir.path().join("known_hosts").display()
            )),
            "{args}"
        );
        assert!(!args.contains("HostKeyAlias"), "{args}");
    }

    #[test]
    fn no_key_is_ever_accepted_on_first_sight() {
        let dir = tempfile::tempdir().unwrap();
        for target in [target(), recorded()] {
            let transport = SshTransport::new("web-1", target, settings(dir.path()));
            for mode in [Mode::Batch, Mode::Interactive] {
                let args = args(&transport, mode);
                assert!(!args.contains("accept-new"), "{args}");
                assert!(!args.contains("StrictHostKeyChecking=no"), "{args}");
            }
        }
    }

    #[test]
    fn published_keys_are_parsed_strictly() {
        let key = HostKey::parse(&format!("{ED25519} root@ip-10-0-1-5")).unwrap();
        assert_eq!(key.algorithm(), "ssh-ed25519");
        let refused = [
            // Another line smuggled into a known_hosts file, whatever the value says.
            format!("* {ED25519}"),
            format!("@revoked {ED25519}"),
            "ssh-ed25519".to_owned(),
            "ssh-ed25519 AAAA$(reboot)".to_owned(),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIgK=JC2V".to_owned(),
            // The blob names another algorithm than the line.
            format!("ssh-rsa {}", &ED25519["ssh-ed25519 ".len()..]),
            format!("ecdsa-sha2-nistp256 {}", &ED25519["ssh-ed25519 ".len()..]),
        ];
        for line in refused {
            assert!(HostKey::parse(&line).is_err(), "accepted: {line}");
        }
        assert!(HostKey::parse_all(&format!("{ED25519}\n* {ECDSA}\n")).is_err());
        assert_eq!(
            HostKey::parse_all(&format!("{ED25519}\r\n{ECDSA}\r\n"))
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn an_alias_is_a_plain_name() {
        let keys = || HostKey::parse_all(ED25519).unwrap();
        assert!(PinnedKeys::new("i-0123456789abcdef0", keys(), "x").is_ok());
        for bad in [
            "",
            "../etc/passwd",
            "i-1 *",
            "-oProxyCommand",
            ".hidden",
            "i-1\n",
        ] {
            assert!(
                PinnedKeys::new(bad, keys(), "x").is_err(),
                "accepted {bad:?}"
            );
        }
        assert!(PinnedKeys::new("i-1", Vec::new(), "x").is_err());
    }

    #[test]
    fn pruning_keeps_only_the_servers_that_run() {
        let dir = tempfile::tempdir().unwrap();
        let settings = settings(dir.path());
        std::fs::create_dir_all(settings.pinned_dir()).unwrap();
        for alias in ["i-1", "i-2", "i-3"] {
            std::fs::write(settings.pinned_known_hosts(&pinned(alias)), "x").unwrap();
        }
        assert_eq!(settings.prune_pinned(&["i-2"]).unwrap(), ["i-1", "i-3"]);
        assert!(settings.pinned_known_hosts(&pinned("i-2")).exists());
        assert!(!settings.pinned_known_hosts(&pinned("i-1")).exists());
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
                ..recorded()
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
        assert!(proxy.contains("StrictHostKeyChecking=yes"), "{proxy}");
        assert!(!proxy.contains("HostKeyAlias"), "{proxy}");
        assert_eq!(args.last().unwrap(), "10.0.1.5");
    }

    #[test]
    fn percent_signs_in_paths_are_not_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = SshSettings::new(dir.path().join("100%/known_hosts"), "/tmp/cm");
        settings.persist = Duration::from_secs(5);
        let transport = SshTransport::new("web-1", target(), Arc::new(settings));
        let args = args(&transport, Mode::Batch);
        assert!(args.contains("100%%/pinned/i-0abc"), "{args}");
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
        let error = failure("web-1", &recorded(), &settings, &stderr);
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
    fn a_key_the_server_did_not_publish_is_refused_with_nothing_to_forget() {
        let dir = tempfile::tempdir().unwrap();
        let settings = settings(dir.path());
        for line in [
            "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @",
            "No ED25519 host key is known for i-0abc and you have requested strict checking.",
        ] {
            let error = failure("web-1", &target(), &settings, &[line.to_owned()]);
            assert_eq!(
                error.to_string(),
                "web-1 (admin@203.0.113.7:22) did not show any of the host keys it published \
                 (SSM parameter /shop/prod/hostkeys/i-0abc): someone may be intercepting the \
                 connection, or the address now belongs to another machine; rigger does not \
                 connect. `rigger status` shows whether the server still runs"
            );
            assert!(error.is_unreachable());
        }
    }

    #[test]
    fn failures_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let settings = settings(dir.path());
        let check = |line: &str| failure("web-1", &recorded(), &settings, &[line.to_owned()]);
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
