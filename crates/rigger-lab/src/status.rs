//! The lab's records: what `rigger lab up` decided ([`Settings`], `lab.json`), what the runner
//! reports ([`RunnerStatus`], `status.json`, rewritten after every change), and what
//! `rigger lab status` prints ([`LabStatus`]). All are JSON files of mode 0600 in the state
//! directory, written atomically (a reader never sees half of one).

use std::path::Path;

use anyhow::Context as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What `rigger lab up` decided, for the runner and for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// The lab's AWS endpoint, the front's plain-HTTP listener on 127.0.0.1 ([`crate::front`]):
    /// what `--endpoint-url` takes.
    pub endpoint: String,
    /// The emulator's own URL, on a loopback port only the front and the runner use.
    #[serde(default)]
    pub emulator: String,
    /// The one region whose instances become machines.
    pub region: String,
    /// The baked lab image's AMI id (the lab's `ami`).
    pub ami: String,
    /// Its recipe hash.
    pub image_hash: String,
    /// Its root filesystem.
    pub image_rootfs: String,
    /// The stock lab image's AMI id ([`crate::image::Flavor::Stock`]).
    #[serde(default)]
    pub stock_ami: String,
    /// Its root filesystem.
    #[serde(default)]
    pub stock_image_rootfs: String,
}

/// The runner's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Setting up the network and the metadata service.
    Starting,
    /// Following the emulator's instances.
    Ready,
    /// Stopping every machine.
    Stopping,
    /// Everything it started is gone.
    Stopped,
    /// It could not start (the message says why).
    Failed,
}

/// A machine's state as the runner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineState {
    /// `systemd-nspawn` is running it (booting or booted).
    Running,
    /// Its instance is stopped: no processes, its disk kept.
    Stopped,
    /// It stopped by itself while its instance was running (a poweroff inside, a crash).
    Exited,
    /// It could not be made (the detail says why).
    Failed,
}

impl MachineState {
    /// The name JSON uses.
    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Running => "running",
            MachineState::Stopped => "stopped",
            MachineState::Exited => "exited",
            MachineState::Failed => "failed",
        }
    }
}

/// One machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineStatus {
    pub instance_id: String,
    /// The instance's private address (the machine's `eth0`).
    pub address: Option<String>,
    pub state: MachineState,
    /// The instance's state in the emulator.
    pub instance_state: String,
    pub hostname: Option<String>,
    /// Why it failed or exited.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
    /// The pid of its `systemd-nspawn` while running.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pid: Option<i32>,
    /// Proportional memory of all its processes (shared pages split between sharers), while
    /// running.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub memory_pss_bytes: Option<u64>,
}

/// What the runner reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerStatus {
    pub pid: i32,
    pub phase: Phase,
    pub message: String,
    /// The lab's network (the emulator's default VPC range).
    pub network: Option<String>,
    /// The address this machine reaches machines from, in the lab's namespace.
    pub lab_address: Option<String>,
    /// The jump host this machine reaches machines through over SSH.
    #[serde(default)]
    pub bastion: Option<BastionStatus>,
    pub machines: Vec<MachineStatus>,
    /// The emulator's load balancers as HAProxy serves them ([`crate::balancer`]).
    #[serde(default)]
    pub load_balancers: Vec<BalancerStatus>,
}

/// A load balancer of the emulator as the lab serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalancerStatus {
    pub name: String,
    /// `classic` or `application`.
    pub kind: String,
    /// Where it listens on this machine's loopback.
    pub address: String,
    /// `https://ADDRESS/` when it has an HTTPS listener on 443, else `http://ADDRESS/`: what
    /// `rigger status` prints, and it works from this machine.
    pub url: String,
    /// Its registered instances, with HAProxy's view of their health.
    pub backends: Vec<BackendStatus>,
}

/// A registered instance behind a lab load balancer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub instance_id: String,
    /// Its private address; none while it has no running machine.
    pub address: Option<String>,
    /// `in_service` (its health check passes in HAProxy), `out_of_service`, or `draining`
    /// (deregistered from a target group, finishing its connections).
    pub state: String,
    /// The target group it is registered with (application load balancers: an instance in
    /// two groups is listed twice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_group: Option<String>,
}

/// The lab's bastion ([`crate::bastion`]), as rigger.toml and `known_hosts` name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BastionStatus {
    /// `nobody@127.31.N.1`: the value of `bastion` in rigger.toml.
    pub target: String,
    /// Its host key, `ssh-ed25519 AAAA...`.
    pub host_key: String,
    /// The line for the environment's `known_hosts`.
    pub known_hosts_line: String,
}

/// What `rigger lab status` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LabStatus {
    /// `up`, `down`, or `broken` (some of its processes died: `rigger lab down` cleans up).
    pub state: String,
    /// The lab's AWS endpoint (`--endpoint-url`; the front before the emulator), while up.
    pub endpoint: Option<String>,
    /// The baked lab image's AMI id (every role's packages; what tests launch): the current
    /// recipe's image, or the one the running lab uses.
    pub ami: Option<String>,
    /// Both lab images' AMI ids by flavor (`stock`: Debian's EC2 AMI as it is; `baked`: the
    /// `ami` above), the same way.
    pub amis: std::collections::BTreeMap<String, String>,
    pub region: Option<String>,
    /// The network namespace machines are reached from: `ip netns exec NAMESPACE ssh
    /// admin@ADDRESS`.
    pub namespace: String,
    pub network: Option<String>,
    pub lab_address: Option<String>,
    /// The jump host machines are reached through from this machine, while up.
    pub bastion: Option<BastionStatus>,
    pub emulator_pid: Option<i32>,
    pub runner_pid: Option<i32>,
    pub runner_phase: Option<Phase>,
    pub message: Option<String>,
    pub machines: Vec<MachineStatus>,
    pub load_balancers: Vec<BalancerStatus>,
    /// What is left of a lab that is not running cleanly (processes, namespaces, mounts,
    /// cgroups).
    pub leftovers: Vec<String>,
}

/// Reads a record; `None` when it does not exist.
pub fn read<T: DeserializeOwned>(path: &Path) -> anyhow::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).with_context(|| {
            format!(
                "{} is damaged; `rigger lab down` removes it",
                path.display()
            )
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes a record atomically, mode 0600.
pub fn write<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(value).context("encoding a lab record")?;
    rigger_local::files::write_atomically(path, &json)
        .with_context(|| format!("writing {}", path.display()))
}
