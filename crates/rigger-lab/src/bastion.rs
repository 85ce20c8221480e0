//! The lab's bastion: how this machine reaches the lab's machines over SSH, the way an
//! operator reaches private servers on AWS, through a jump host in the VPC (`bastion =
//! "user@host"` in rigger.toml). Nothing rigger renders or runs changes for the lab.
//!
//! - An `sshd` of this machine's, run in the lab's namespace on the VPC router's address
//!   (port 22), with a host key, configuration and authorized keys of the lab's own (under
//!   `<state>/bastion/`), in a cgroup of the lab's so `rigger lab down` finds whatever of it is
//!   left. It lets in one user, `nobody` (a jump account needs no privileges and no shell),
//!   with the public keys of the emulator's key pairs (the keys machines are launched with),
//!   each `restrict`ed to forwarding to port 22: no shell, no TTY, no agent, no listening.
//! - A forwarder in the runner listens on this machine's loopback
//!   ([`Lab::loopback_address`]`(`[`LOOPBACK_HOST`]`)`, port 22) and carries each connection
//!   to that sshd through a socket made in the lab's namespace. Nothing else links this
//!   machine's network to the lab's.
//!
//! `rigger lab status` prints the bastion's address and host key: the operator records the key
//! in the environment's `known_hosts` (rigger did not make the host) and sets `bastion =
//! "nobody@<address>"`.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use rigger_local::process::{self, ProcessSpec, Supervised};

use crate::layout::Lab;
use crate::sys;

/// The bastion's host number in the lab's loopback block.
pub const LOOPBACK_HOST: u8 = 1;
/// The account operators jump as.
pub const USER: &str = "nobody";
/// The port machines' sshd listens on (rigger's `ssh_port` default): the only one forwarded to.
const MACHINE_SSH_PORT: u16 = 22;
const SSHD: &str = "/usr/sbin/sshd";

/// The bastion's files and addresses.
pub struct Bastion {
    dir: PathBuf,
    namespace: String,
    /// Where sshd listens, in the lab's namespace.
    inside: SocketAddrV4,
    /// Where this machine connects, on its loopback.
    outside: SocketAddrV4,
    /// The host's public key (`ssh-ed25519 AAAA...`).
    pub host_key: String,
}

impl Bastion {
    /// Makes the bastion's host key (once per lab) and configuration; `router` is the VPC
    /// router's address in the lab's namespace.
    pub fn prepare(lab: &Lab, router: Ipv4Addr) -> anyhow::Result<Bastion> {
        let dir = lab.state.join("bastion");
        sys::create_trusted_dir(&dir, 0o700)?;
        let key = dir.join("ssh_host_ed25519_key");
        if !key.exists() {
            let status = std::process::Command::new("ssh-keygen")
                .args([
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "rigger-lab-bastion",
                    "-f",
                ])
                .arg(&key)
                .stdin(std::process::Stdio::null())
                .status()
                .context("running ssh-keygen (package openssh-client)")?;
            if !status.success() {
                bail!("ssh-keygen could not make the bastion's host key ({status})");
            }
        }
        let public = std::fs::read_to_string(key.with_extension("pub"))
            .with_context(|| format!("reading {}.pub", key.display()))?;
        let host_key = public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let inside = SocketAddrV4::new(router, 22);
        let config = config_text(&dir, inside);
        write_private(&dir.join("sshd_config"), &config)?;
        if !dir.join("authorized_keys").exists() {
            write_private(&dir.join("authorized_keys"), "")?;
        }
        Ok(Bastion {
            dir,
            namespace: lab.namespace(),
            inside,
            outside: SocketAddrV4::new(lab.loopback_address(LOOPBACK_HOST), 22),
            host_key,
        })
    }

    /// `nobody@127.31.N.1`: what rigger.toml's `bastion` says.
    pub fn target(&self) -> String {
        format!("{USER}@{}", self.outside.ip())
    }

    /// The line of a `known_hosts` file that trusts this bastion.
    pub fn known_hosts_line(&self) -> String {
        format!("{} {}", self.outside.ip(), self.host_key)
    }

    /// Starts sshd in the lab's namespace, in cgroup `groups` (one per hierarchy), its
    /// output in `log`.
    pub async fn start(&self, lab: &Lab, log: &Path) -> anyhow::Result<Supervised> {
        let groups: Vec<PathBuf> = sys::cgroup_roots()
            .into_iter()
            .map(|root| root.join(lab.cgroup()).join("bastion"))
            .collect();
        for group in &groups {
            std::fs::create_dir_all(group)
                .with_context(|| format!("creating cgroup {}", group.display()))?;
        }
        // sshd's privilege separation needs its directory (Debian's unit makes it).
        std::fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;
        let mut args = sys::enter_cgroups_args(&groups);
        args.extend([
            "ip".to_owned(),
            "netns".to_owned(),
            "exec".to_owned(),
            self.namespace.clone(),
            SSHD.to_owned(),
            "-D".to_owned(),
            "-e".to_owned(),
            "-f".to_owned(),
            self.dir.join("sshd_config").display().to_string(),
        ]);
        let spec = ProcessSpec {
            name: "bastion".to_owned(),
            program: PathBuf::from("/bin/sh"),
            args,
            env: [("PATH".to_owned(), process::DEFAULT_PATH.to_owned())]
                .into_iter()
                .collect(),
            cwd: Some(self.dir.clone()),
            user: None,
            log_path: log.to_path_buf(),
            pid_path: lab.pids_dir().join("bastion.pid"),
            stop_signal: nix::sys::signal::Signal::SIGTERM,
            stop_timeout: Duration::from_secs(5),
        };
        process::spawn(&spec)
            .await
            .context("starting the bastion's sshd")
    }

    /// Listens on this machine's loopback for the forwarder.
    pub fn listen(&self) -> anyhow::Result<tokio::net::TcpListener> {
        let listener = std::net::TcpListener::bind(self.outside).with_context(|| {
            format!(
                "listening on {} for the lab's bastion (another lab, or something else, holds \
                 it: `rigger lab status --dir DIR` of each lab)",
                self.outside
            )
        })?;
        listener.set_nonblocking(true)?;
        Ok(tokio::net::TcpListener::from_std(listener)?)
    }

    /// Carries every connection from `listener` to sshd in the lab's namespace, until dropped.
    pub async fn forward(self: Arc<Self>, listener: tokio::net::TcpListener) {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (mut client, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "bastion: accepting");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            while connections.try_join_next().is_some() {}
            let bastion = Arc::clone(&self);
            connections.spawn(async move {
                let inside = bastion.inside;
                let connected = sys::in_namespace(&bastion.namespace, move || {
                    let stream = std::net::TcpStream::connect_timeout(
                        &inside.into(),
                        Duration::from_secs(5),
                    )?;
                    stream.set_nonblocking(true)?;
                    Ok(stream)
                })
                .and_then(tokio::net::TcpStream::from_std);
                match connected {
                    Ok(mut server) => {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                    Err(error) => tracing::warn!(%peer, %error, "bastion: connecting to sshd"),
                }
            });
        }
    }

    /// Authorizes `keys` (OpenSSH public keys, one per key pair) for the jump user, each
    /// restricted to forwarding to machines' sshd. Writes only when they changed; returns
    /// whether it did.
    pub fn authorize(&self, keys: &[String]) -> anyhow::Result<bool> {
        let text = authorized_keys_text(keys);
        let path = self.dir.join("authorized_keys");
        if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        write_private(&path, &text)?;
        Ok(true)
    }
}

/// sshd's configuration: one user, keys only, forwarding to port 22 only, nothing else. The
/// keys are read by root (`AuthorizedKeysCommand`), not as the jump user: the lab's state
/// directory is root's alone.
/// `StrictModes no`: the lab's state directory may sit under a world-writable parent
/// (/var/tmp, sticky) that sshd's path check refuses; the lab itself checks its directory is
/// root's and not writable by others ([`sys::check_trusted_dir`]), and every file here is
/// root's, 0600.
fn config_text(dir: &Path, listen: SocketAddrV4) -> String {
    let d = dir.display();
    format!(
        "# The rigger lab's bastion (crates/rigger-lab/src/bastion.rs): made by the lab.\n\
         ListenAddress {listen}\n\
         HostKey {d}/ssh_host_ed25519_key\n\
         PidFile none\n\
         AuthorizedKeysFile none\n\
         AuthorizedKeysCommand /bin/cat {d}/authorized_keys\n\
         AuthorizedKeysCommandUser root\n\
         AllowUsers {USER}\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         UsePAM no\n\
         PermitRootLogin no\n\
         StrictModes no\n\
         PermitTTY no\n\
         PermitTunnel no\n\
         X11Forwarding no\n\
         AllowAgentForwarding no\n\
         AllowStreamLocalForwarding no\n\
         AllowTcpForwarding local\n\
         GatewayPorts no\n\
         PermitOpen *:{MACHINE_SSH_PORT}\n\
         ForceCommand /bin/false\n\
         ClientAliveInterval 30\n\
         LogLevel INFO\n"
    )
}

fn authorized_keys_text(keys: &[String]) -> String {
    let mut keys: Vec<&str> = keys
        .iter()
        .map(|k| k.trim())
        .filter(|k| is_public_key(k))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys.iter()
        .map(|key| format!("restrict,port-forwarding,permitopen=\"*:{MACHINE_SSH_PORT}\" {key}\n"))
        .collect()
}

/// Whether `key` is one line `type base64 [comment]` that cannot carry options of its own.
fn is_public_key(key: &str) -> bool {
    let mut words = key.split_whitespace();
    let (Some(kind), Some(body)) = (words.next(), words.next()) else {
        return false;
    };
    !key.contains(['\n', '\r', '"'])
        && (kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-"))
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
}

/// Writes `text` to `path` through a temporary file renamed over it, 0600.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text).with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_restricted_to_forwarding_to_machines_sshd() {
        let keys = vec![
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA me@laptop\n".to_owned(),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA me@laptop".to_owned(),
            "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ".to_owned(),
        ];
        assert_eq!(
            authorized_keys_text(&keys),
            "restrict,port-forwarding,permitopen=\"*:22\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA me@laptop\n\
             restrict,port-forwarding,permitopen=\"*:22\" ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ\n"
        );
    }

    #[test]
    fn a_key_that_would_bring_options_of_its_own_is_left_out() {
        for hostile in [
            "command=\"sh\" ssh-ed25519 AAAA",
            "ssh-ed25519 AAAA\nssh-ed25519 BBBB",
            "ssh-ed25519 AA\"AA",
            "ssh-ed25519",
            "",
        ] {
            assert_eq!(
                authorized_keys_text(&[hostile.to_owned()]),
                "",
                "{hostile:?}"
            );
        }
    }

    #[test]
    fn sshd_lets_in_one_user_by_key_for_forwarding_only() {
        let text = config_text(Path::new("/l/bastion"), "172.31.0.1:22".parse().unwrap());
        for line in [
            "ListenAddress 172.31.0.1:22",
            "AllowUsers nobody",
            "PasswordAuthentication no",
            "PermitTTY no",
            "AllowTcpForwarding local",
            "PermitOpen *:22",
            "ForceCommand /bin/false",
            "AuthorizedKeysFile none",
            "AuthorizedKeysCommand /bin/cat /l/bastion/authorized_keys",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
