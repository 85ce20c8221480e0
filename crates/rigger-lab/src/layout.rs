//! Where a lab keeps its state and what it names things, in one place: the state directory
//! (settings, status, pid files, logs, one directory per machine), the image cache, and the
//! names of the network namespaces and cgroups it creates. Everything a lab creates on the
//! system carries its id (`rigger-lab-<id>`), so `rigger lab down` and the tests find exactly
//! what this lab made and nothing of another lab's.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use sha2::Digest as _;

/// Where `rigger lab` keeps its running state unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/tmp/rigger-lab/state";
/// Where built images are cached, outside any clone, so CI machines and checkouts share them.
pub const DEFAULT_IMAGES_DIR: &str = "/var/tmp/rigger-lab/images";

/// One lab: its directories and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lab {
    /// The state directory (absolute).
    pub state: PathBuf,
    /// The image cache (absolute).
    pub images: PathBuf,
    /// Eight hex digits of the state directory's path: two labs with different state
    /// directories never share a name.
    pub id: String,
}

impl Lab {
    /// The lab whose state lives in `state`, with images cached in `images`. The paths are
    /// made absolute; they may not hold characters that the kernel's overlay options or the
    /// namespaces' names cannot carry.
    pub fn new(state: &Path, images: &Path) -> anyhow::Result<Lab> {
        let absolute = |path: &Path| -> anyhow::Result<PathBuf> {
            let path = if path.is_absolute() {
                path.to_path_buf()
            } else {
                std::env::current_dir()
                    .context("reading the current directory")?
                    .join(path)
            };
            check_path(&path)?;
            Ok(path)
        };
        let state = absolute(state)?;
        let images = absolute(images)?;
        let digest = sha2::Sha256::digest(state.as_os_str().as_encoded_bytes());
        let id = hex(&digest)[..8].to_owned();
        Ok(Lab { state, images, id })
    }

    /// The network namespace holding the lab's bridge, the metadata service's address and the
    /// address this machine reaches the lab's machines from.
    pub fn namespace(&self) -> String {
        format!("rigger-lab-{}", self.id)
    }

    /// The loopback address with host number `host` in this lab's block, `127.31.N.host`:
    /// where this machine reaches what the lab serves from its own network namespace (the
    /// bastion, the load balancers). `N` (1 to 254) comes from the lab's id, so two labs with
    /// different state directories almost never share a block, and no block is one of the
    /// local provider's (its default is 127.77, its tests use 78 to 84).
    /// Whoever binds one of these addresses reports a clear error when it is taken.
    pub fn loopback_address(&self, host: u8) -> std::net::Ipv4Addr {
        let n = u32::from_str_radix(&self.id, 16).unwrap_or(0) % 254 + 1;
        std::net::Ipv4Addr::new(127, 31, n as u8, host)
    }

    /// The network namespace of the machine of instance `instance_id`.
    pub fn machine_namespace(&self, instance_id: &str) -> String {
        format!("rigger-lab-{}-{instance_id}", self.id)
    }

    /// Whether `name` is a network namespace of this lab (its own or a machine's).
    pub fn owns_namespace(&self, name: &str) -> bool {
        let own = self.namespace();
        name == own
            || name
                .strip_prefix(&own)
                .is_some_and(|rest| rest.starts_with('-'))
    }

    /// The cgroup (under each hierarchy's root) holding one cgroup per machine.
    pub fn cgroup(&self) -> String {
        format!("rigger-lab-{}", self.id)
    }

    /// Held by `up` and `down`, so that one runs at a time.
    pub fn lock_file(&self) -> PathBuf {
        self.state.join("lab.lock")
    }

    /// What `rigger lab up` recorded: the emulator's endpoint, the AMI, the network.
    pub fn settings_file(&self) -> PathBuf {
        self.state.join("lab.json")
    }

    /// What the runner reports: its phase and every machine.
    pub fn status_file(&self) -> PathBuf {
        self.state.join("status.json")
    }

    /// The AMIs the emulator loads at start (moto's `MOTO_AMIS_PATH`).
    pub fn amis_file(&self) -> PathBuf {
        self.state.join("amis.json")
    }

    /// Pid records of the emulator and the runner.
    pub fn pids_dir(&self) -> PathBuf {
        self.state.join("pids")
    }

    pub fn emulator_pid_file(&self) -> PathBuf {
        self.pids_dir().join("emulator.pid")
    }

    pub fn runner_pid_file(&self) -> PathBuf {
        self.pids_dir().join("runner.pid")
    }

    pub fn emulator_log(&self) -> PathBuf {
        self.state.join("emulator.log")
    }

    pub fn runner_log(&self) -> PathBuf {
        self.state.join("runner.log")
    }

    pub fn machines_dir(&self) -> PathBuf {
        self.state.join("machines")
    }

    /// The layers of the images `CreateImage` made of this lab's instances
    /// ([`crate::images`]): they go with the lab.
    pub fn created_images_dir(&self) -> PathBuf {
        self.state.join("created-images")
    }

    /// The machine of instance `instance_id`: its disk (`upper`, `work`), its root (`root`,
    /// the overlay mount), its console log and its pid record.
    pub fn machine_dir(&self, instance_id: &str) -> PathBuf {
        self.machines_dir().join(instance_id)
    }
}

/// Lower-case hexadecimal of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Refuses paths the overlay mount options (`,` `:` separate them) or the lab's own records
/// could not carry.
fn check_path(path: &Path) -> anyhow::Result<()> {
    let Some(text) = path.to_str() else {
        bail!(
            "{}: the lab's directories must be UTF-8 paths",
            path.display()
        );
    };
    if let Some(bad) = text
        .chars()
        .find(|c| matches!(c, ',' | ':' | '\\') || c.is_whitespace() || c.is_control())
    {
        bail!(
            "{text}: the lab's directories may not contain {bad:?} (the kernel's overlay \
             options cannot carry it); choose another directory"
        );
    }
    Ok(())
}

/// Whether `id` is an EC2 instance id (`i-` and 8 or 17 hex digits), the only form the lab
/// puts into paths, names and command lines.
pub fn is_instance_id(id: &str) -> bool {
    id.strip_prefix("i-").is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17) && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_id_of_the_state_directory() {
        let a = Lab::new(Path::new("/var/tmp/a"), Path::new("/var/tmp/images")).unwrap();
        let b = Lab::new(Path::new("/var/tmp/b"), Path::new("/var/tmp/images")).unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(a.id.len(), 8);
        assert_eq!(a.namespace(), format!("rigger-lab-{}", a.id));
        assert!(a.owns_namespace(&a.namespace()));
        assert!(a.owns_namespace(&a.machine_namespace("i-0123456789abcdef0")));
        assert!(!a.owns_namespace(&b.namespace()));
        assert!(!a.owns_namespace(&format!("{}0", a.namespace())));
    }

    #[test]
    fn paths_the_overlay_options_cannot_carry_are_refused() {
        for bad in ["/tmp/a,b", "/tmp/a:b", "/tmp/a b", "/tmp/a\nb"] {
            let error = Lab::new(Path::new(bad), Path::new("/tmp/images")).unwrap_err();
            assert!(error.to_string().contains("may not contain"), "{error}");
        }
    }

    #[test]
    fn instance_ids() {
        assert!(is_instance_id("i-0123456789abcdef0"));
        assert!(is_instance_id("i-01234567"));
        assert!(!is_instance_id("i-0123456789abcdef"));
        assert!(!is_instance_id("i-../../etc"));
        assert!(!is_instance_id("x-01234567"));
    }
}
