//! One machine: the instance's disk, network and `systemd-nspawn`.
//!
//! Its disk is an overlay: its AMI's layers read-only below (the lab image, and for an image
//! made of an instance that instance's frozen layer above it: [`crate::images`]), the
//! machine's own `upper` above (what it writes; kept while its instance is stopped, deleted
//! when it is terminated).
//! Before its first boot the lab's CA is added to its trust ([`crate::pki::trust_in_machine`],
//! in its own layer), so the AWS CLI inside trusts the lab's front at the AWS host names. Its
//! network is a namespace of its own ([`crate::net`]). It boots with `systemd-nspawn -b` in a
//! cgroup of its own under each hierarchy (on a machine whose PID 1 is not systemd, nspawn
//! otherwise shares one with every other machine), with the instance's private address's
//! host name, with the right to manage its own network (as root on an instance has), without
//! registering with a systemd on this machine, without touching this machine's resolv.conf,
//! journal or time zone, with the EBS volumes attached when it starts bound at their device
//! names ([`crate::volume`]) and a systemd generator that mounts fstab's device entries at
//! boot as an instance's systemd does (in a container systemd skips them). `systemd-nspawn`
//! is started as a process-group
//! leader with a pid record ([`rigger_local::process`]), so a later `rigger lab down` stops it
//! even when the runner that started it was killed.
//!
//! Stopping sends nspawn SIGTERM, which it turns into an orderly shutdown of the machine's
//! systemd; whatever is still in the machine's cgroups after nspawn is gone is killed. Then the
//! disk is unmounted and the namespace deleted (its veth goes with it).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use nix::sys::signal::Signal;
use rigger_local::process::{self, PidRecord, ProcessSpec, StopOutcome, Supervised};

use crate::layout::Lab;
use crate::net::{self, Cidr, MachineLink};
use crate::sys;
use crate::volume::BootDisk;

/// How long a machine may take to shut down before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// What a machine is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineSpec {
    pub instance_id: String,
    pub address: Ipv4Addr,
    pub vpc: Cidr,
    /// `ip-172-31-0-4`, as EC2 names an instance by its private address.
    pub hostname: String,
    pub mac: String,
    /// The AMI's layers, top first (the overlay's lower layers): a lab image's root
    /// filesystem, below the layers of images made of instances ([`crate::images`]).
    pub lowers: Vec<PathBuf>,
    /// The bridge port's number ([`net::bridge_port`]).
    pub port_index: u64,
    /// The EBS volumes attached when it starts ([`crate::volume::Volumes::boot_disks`]).
    pub disks: Vec<BootDisk>,
}

/// The host name EC2 gives an instance with private address `address`.
pub fn hostname(address: Ipv4Addr) -> String {
    let [a, b, c, d] = address.octets();
    format!("ip-{a}-{b}-{c}-{d}")
}

struct Paths {
    dir: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    root: PathBuf,
    console: PathBuf,
    pid: PathBuf,
    /// Written once the lab's CA is in the machine's trust, before its first boot.
    trusted: PathBuf,
}

fn paths(lab: &Lab, instance_id: &str) -> Paths {
    let dir = lab.machine_dir(instance_id);
    Paths {
        upper: dir.join("upper"),
        work: dir.join("work"),
        root: dir.join("root"),
        console: dir.join("console.log"),
        pid: dir.join("pids").join("nspawn.pid"),
        trusted: dir.join("lab-ca-trusted"),
        dir,
    }
}

/// The cgroups of the machine of `instance_id`, one per hierarchy.
fn cgroups(lab: &Lab, instance_id: &str) -> Vec<PathBuf> {
    sys::cgroup_roots()
        .into_iter()
        .map(|root| root.join(lab.cgroup()).join(instance_id))
        .collect()
}

/// Starts the machine of `spec` (its disk is reused if it has one: a stopped instance started
/// again). On failure everything made so far is undone.
pub async fn start(lab: &Lab, spec: &MachineSpec) -> anyhow::Result<Supervised> {
    let result = start_inner(lab, spec).await;
    if result.is_err() {
        let _ = stop(lab, &spec.instance_id, STOP_TIMEOUT).await;
    }
    result
}

async fn start_inner(lab: &Lab, spec: &MachineSpec) -> anyhow::Result<Supervised> {
    let id = spec.instance_id.as_str();
    if !crate::layout::is_instance_id(id) {
        bail!("{id:?} is not an instance id");
    }
    let p = paths(lab, id);
    for dir in [&p.upper, &p.work, &p.root] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if sys::mounts_under(&p.root).is_empty() {
        if spec.lowers.is_empty() {
            anyhow::bail!("the machine's image has no layer");
        }
        let lowers: Vec<String> = spec
            .lowers
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lowers.join(":"),
            p.upper.display(),
            p.work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            &p.root,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(options.as_str()),
        )
        .with_context(|| format!("mounting the machine's disk at {}", p.root.display()))?;
    }
    // Until the marker exists the machine has never booted: its disk holds only the image's
    // files and the lab's.
    if !p.trusted.exists() {
        let ca = crate::pki::Pki::of(lab).ca_certificate();
        let pem = std::fs::read_to_string(&ca)
            .with_context(|| format!("reading the lab's CA {}", ca.display()))?;
        crate::pki::trust_in_machine(&pem, &p.root)
            .context("adding the lab's CA to the machine's trust")?;
        std::fs::write(&p.trusted, "")
            .with_context(|| format!("writing {}", p.trusted.display()))?;
    }

    let namespace = lab.machine_namespace(id);
    // A namespace left by a runner that was killed holds a stale veth: start afresh.
    net::remove_namespace(&namespace).await?;
    net::create_machine(&MachineLink {
        lab_namespace: lab.namespace(),
        namespace: namespace.clone(),
        port: net::bridge_port(spec.port_index),
        mac: spec.mac.clone(),
        address: spec.address,
        vpc: spec.vpc,
    })
    .await?;

    let generators = write_generators(lab)?;

    let groups = cgroups(lab, id);
    for group in &groups {
        std::fs::create_dir_all(group)
            .with_context(|| format!("creating cgroup {}", group.display()))?;
    }
    // A shell puts itself in the machine's cgroups and becomes systemd-nspawn (same pid), so
    // nspawn and everything it starts are in them from the first instruction.
    let mut args = sys::enter_cgroups_args(&groups);
    args.extend([
        "systemd-nspawn".to_owned(),
        "--quiet".to_owned(),
        format!("--directory={}", p.root.display()),
        format!("--machine={id}"),
        format!("--hostname={}", spec.hostname),
        "--boot".to_owned(),
        "--register=no".to_owned(),
        "--keep-unit".to_owned(),
        format!("--network-namespace-path=/run/netns/{namespace}"),
        // A pty whose output goes to console.log (`pipe` gives the machine no /dev/console:
        // what a boot writes there, as a builder reports its outcome, would be lost).
        "--console=read-only".to_owned(),
        "--resolv-conf=off".to_owned(),
        "--link-journal=no".to_owned(),
        "--timezone=off".to_owned(),
        // Root on an instance manages its own network: rigger's boot script loads nftables
        // rules. Only this machine's namespace, which leads nowhere but the lab's bridge.
        "--capability=CAP_NET_ADMIN".to_owned(),
        // fstab's device entries mounted at boot, as on an instance (see the generator).
        format!("--bind-ro={}:{GENERATORS_IN_MACHINE}", generators.display()),
    ]);
    // Its volumes, there before its first unit starts.
    args.extend(
        spec.disks
            .iter()
            .map(|disk| format!("--bind={}:/dev/{}", disk.loop_device, disk.name)),
    );
    let spec = ProcessSpec {
        name: format!("machine {id}"),
        program: PathBuf::from("/bin/sh"),
        args,
        env: [("PATH".to_owned(), process::DEFAULT_PATH.to_owned())]
            .into_iter()
            .collect(),
        cwd: Some(p.dir.clone()),
        user: None,
        log_path: p.console.clone(),
        pid_path: p.pid.clone(),
        stop_signal: Signal::SIGTERM,
        stop_timeout: STOP_TIMEOUT,
    };
    process::spawn(&spec)
        .await
        .with_context(|| format!("starting systemd-nspawn for {id}"))
}

/// Where a machine finds the lab's systemd generators (bound read-only): a directory of
/// systemd's search path that Debian leaves empty.
const GENERATORS_IN_MACHINE: &str = "/usr/local/lib/systemd/system-generators";

/// The generator that mounts fstab's device entries in a machine, which systemd skips in a
/// container (its /sys is read-only) and an instance's systemd mounts: rigger's data volume
/// line must hold across a reboot.
const FSTAB_DEVICES_GENERATOR: &str = include_str!("../assets/fstab-devices-generator");

/// Writes the lab's generators for machines (unless they are there as they should be) and
/// returns their directory.
fn write_generators(lab: &Lab) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = lab.state.join("machine-generators");
    sys::create_trusted_dir(&dir, 0o755)?;
    let file = dir.join("rigger-lab-fstab-devices");
    if std::fs::read_to_string(&file).ok().as_deref() != Some(FSTAB_DEVICES_GENERATOR) {
        rigger_local::files::write_atomically(&file, FSTAB_DEVICES_GENERATOR.as_bytes())
            .with_context(|| format!("writing {}", file.display()))?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} executable", file.display()))?;
    }
    Ok(dir)
}

/// The record of the machine's running `systemd-nspawn`, if it runs.
pub fn running(lab: &Lab, instance_id: &str) -> Option<PidRecord> {
    PidRecord::read(&paths(lab, instance_id).pid).filter(PidRecord::is_alive)
}

/// Stops the machine of `instance_id` and undoes its mount, cgroups and namespace; its disk
/// stays. Safe to call for a machine that is half made, stopped, or unknown.
pub async fn stop(lab: &Lab, instance_id: &str, timeout: Duration) -> anyhow::Result<StopOutcome> {
    let p = paths(lab, instance_id);
    let outcome = match PidRecord::read(&p.pid) {
        Some(record) => process::stop(&record, Signal::SIGTERM, timeout).await,
        None => StopOutcome::NotRunning,
    };
    for group in cgroups(lab, instance_id) {
        sys::remove_cgroup_tree(&group, Duration::from_secs(10))?;
    }
    for point in sys::mounts_under(&p.dir) {
        sys::unmount(&point)?;
    }
    net::remove_namespace(&lab.machine_namespace(instance_id)).await?;
    Ok(outcome)
}

/// Stops the machine and deletes its disk (its instance was terminated).
pub async fn remove(
    lab: &Lab,
    instance_id: &str,
    timeout: Duration,
) -> anyhow::Result<StopOutcome> {
    let outcome = stop(lab, instance_id, timeout).await?;
    sys::remove_tree(&paths(lab, instance_id).dir)?;
    Ok(outcome)
}

/// Proportional memory of the machine's processes (nspawn and everything below it).
pub fn memory_pss_bytes(record: &PidRecord) -> Option<u64> {
    process::group_memory(record.pid).and_then(|m| m.pss_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_follow_ec2() {
        assert_eq!(hostname(Ipv4Addr::new(172, 31, 0, 4)), "ip-172-31-0-4");
    }
}
