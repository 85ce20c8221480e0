//! Real OpenSSH servers for the tests: each on its own loopback address, with its own host key
//! and an `authorized_keys` holding the tests' client key, started with a generated
//! `sshd_config` and stopped (with every connection it forked) when dropped, even when a test
//! fails.
//!
//! Needs root (sshd binds port 22 and switches users) and openssh-server
//! (`scripts/install-packages.sh` installs it).

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rigger_transport::ssh::{
    HostKey, HostKeyCheck, PinnedKeys, SshSettings, SshTarget, SshTransport,
};

pub const SSHD: &str = "/usr/sbin/sshd";

/// A directory with a client key, and servers started in it.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub client_key: PathBuf,
    pub settings: Arc<SshSettings>,
}

impl Lab {
    pub fn new() -> Lab {
        assert!(
            nix::unistd::geteuid().is_root(),
            "these tests start sshd on port 22 and log in as root: run them as root"
        );
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: run scripts/install-packages.sh (it installs openssh-server)"
        );
        // sshd insists on its privilege separation directory (the package's service makes it).
        std::fs::create_dir_all("/run/sshd").expect("creating /run/sshd");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let client_key = dir.path().join("client_key");
        keygen(&client_key);
        let mut settings =
            SshSettings::new(dir.path().join("ssh/known_hosts"), dir.path().join("cm"));
        settings.persist = Duration::from_secs(5);
        settings.connect_timeout = Duration::from_secs(5);
        settings.forget_hint = Some("rigger ssh -e test --forget-host-key".into());
        settings.prepare().expect("preparing the SSH directories");
        Lab {
            dir,
            client_key,
            settings: Arc::new(settings),
        }
    }

    /// Starts sshd on `address`:22 with a new host key.
    pub fn sshd(&self, address: Ipv4Addr) -> Sshd {
        Sshd::start(self.dir.path(), &self.client_key, address)
    }

    /// Starts one sshd per address, all at once.
    pub fn sshds(&self, addresses: impl IntoIterator<Item = Ipv4Addr>) -> Vec<Sshd> {
        let addresses: Vec<Ipv4Addr> = addresses.into_iter().collect();
        std::thread::scope(|scope| {
            let handles: Vec<_> = addresses
                .iter()
                .map(|address| scope.spawn(|| self.sshd(*address)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("sshd started"))
                .collect()
        })
    }

    /// Root at `address`:22 with the lab's client key, checked against the host key the sshd
    /// there was started with, as a server rigger created publishes it (under the alias
    /// `srv-<address>`).
    pub fn target(&self, address: Ipv4Addr) -> SshTarget {
        let alias = format!("srv-{address}");
        self.pinned_target(address, &alias, &self.host_key(address))
    }

    /// Root at `address`:22, checked against `public_key` (a `.pub` line) under `alias`.
    pub fn pinned_target(&self, address: Ipv4Addr, alias: &str, public_key: &str) -> SshTarget {
        let keys = HostKey::parse_all(public_key).expect("a public key");
        SshTarget {
            identity_file: Some(self.client_key.clone()),
            host_keys: HostKeyCheck::Pinned(
                PinnedKeys::new(alias, keys, format!("the test's {alias}")).unwrap(),
            ),
            ..SshTarget::new(address.to_string(), "root")
        }
    }

    /// Root at `address`:22, whose key must be in the lab's known_hosts already.
    pub fn recorded_target(&self, address: Ipv4Addr) -> SshTarget {
        SshTarget {
            identity_file: Some(self.client_key.clone()),
            ..SshTarget::new(address.to_string(), "root")
        }
    }

    /// The public host key of the sshd last started at `address`.
    pub fn host_key(&self, address: Ipv4Addr) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("sshd-{address}/host_key.pub")))
            .expect("the sshd at this address was started")
    }

    /// Records the key of the sshd at `address` in the lab's known_hosts, as an operator does
    /// after checking its fingerprint.
    pub fn record(&self, address: Ipv4Addr) {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.settings.known_hosts)
            .unwrap();
        writeln!(file, "{address} {}", self.host_key(address).trim()).unwrap();
    }

    pub fn transport(&self, server: &str, target: SshTarget) -> Arc<SshTransport> {
        Arc::new(SshTransport::new(
            server,
            target,
            Arc::clone(&self.settings),
        ))
    }
}

/// One running sshd; stopped on drop.
pub struct Sshd {
    pub address: Ipv4Addr,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Sshd {
    fn start(dir: &Path, client_key: &Path, address: Ipv4Addr) -> Sshd {
        let own = dir.join(format!("sshd-{address}"));
        std::fs::create_dir_all(&own).unwrap();
        let host_key = own.join("host_key");
        let _ = std::fs::remove_file(&host_key);
        let _ = std::fs::remove_file(host_key.with_extension("pub"));
        keygen(&host_key);
        let authorized = own.join("authorized_keys");
        std::fs::copy(client_key.with_extension("pub"), &authorized).unwrap();
        let config = own.join("sshd_config");
        let log = own.join("sshd.log");
        std::fs::write(
            &config,
            format!(
                "ListenAddress {address}:22\n\
                 HostKey {host_key}\n\
                 PidFile {pid}\n\
                 AuthorizedKeysFile {authorized}\n\
                 StrictModes no\n\
                 UsePAM no\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\n\
                 AllowTcpForwarding yes\n\
                 MaxStartups 100:30:200\n\
                 MaxSessions 50\n\
                 UseDNS no\n\
                 PrintMotd no\n\
                 LogLevel ERROR\n",
                host_key = host_key.display(),
                pid = own.join("sshd.pid").display(),
                authorized = authorized.display(),
            ),
        )
        .unwrap();
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-f")
            .arg(&config)
            .arg("-h")
            .arg(&host_key)
            .arg("-E")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting sshd");
        let mut sshd = Sshd {
            address,
            log,
            child: Some(child),
        };
        sshd.wait_listening();
        sshd
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let socket = SocketAddrV4::new(self.address, 22);
        loop {
            if TcpStream::connect_timeout(&socket.into(), Duration::from_millis(200)).is_ok() {
                return;
            }
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("sshd on {socket} did not start ({exited:?}): {log}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops sshd and every connection it serves.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = i32::try_from(child.id()).unwrap();
        // Each connection is a child of the listener in its own session: stop them first, or
        // they (and the clients' master connections) would outlive the test.
        for descendant in descendants(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(descendant),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The processes below `pid`, deepest first.
fn descendants(pid: i32) -> Vec<i32> {
    let mut parents: Vec<(i32, i32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(ppid) = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        parents.push((child, ppid));
    }
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for (child, ppid) in &parents {
            if *ppid == parent {
                found.push(*child);
                frontier.push(*child);
            }
        }
    }
    found.reverse();
    found
}

fn keygen(path: &Path) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "rigger-test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("running ssh-keygen");
    assert!(status.success(), "ssh-keygen failed for {}", path.display());
}

/// `127.90.<block>.1 ..= 127.90.<block>.<count>`.
pub fn addresses(block: u8, count: u8) -> impl Iterator<Item = Ipv4Addr> {
    (1..=count).map(move |n| Ipv4Addr::new(127, 90, block, n))
}
