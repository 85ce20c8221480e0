//! What `rigger lab up | down | status` do.
//!
//! `up` starts two detached processes, each a process-group leader with a pid record under
//! `pids/` ([`rigger_local::process`]): the emulator (moto's server on 127.0.0.1 and a free
//! port, loading the lab image's AMI at start so its id is the same in every lab), then the
//! runner ([`crate::runner`]), and returns once the runner reports ready. The lab's endpoint is
//! not the emulator's port but another one, where the runner's front ([`crate::front`])
//! answers and forwards to the emulator: every client goes through the one front. `down`
//! stops the runner (which stops its machines and removes its network), then the emulator,
//! then sweeps: whatever a killed runner left (machines' processes, cgroups, mounts,
//! namespaces) is removed, and `down` fails if anything is still there. [`leftovers`] is that
//! inventory.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::Signal;
use rigger_engine::progress::Progress;
use rigger_local::process::{self, PidRecord, ProcessSpec};

use crate::image::{self, Flavor};
use crate::layout::Lab;
use crate::net;
use crate::status::{self, LabStatus, Phase, RunnerStatus, Settings};
use crate::sys;

/// How long `up` waits for the emulator to listen and the runner to be ready.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the runner may take to stop every machine.
const RUNNER_STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// Where scripts/moto.sh installs the emulator.
pub const DEFAULT_EMULATOR: &str = "/var/tmp/rigger-moto-venv/bin/moto_server";

/// How to start a lab.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The one region whose instances become machines.
    pub region: String,
    /// moto's `moto_server`.
    pub emulator: PathBuf,
    /// The runner's command line: a program running [`crate::runner::run`] for this lab
    /// (`rigger lab run`), then its arguments.
    pub runner: Vec<OsString>,
}

/// What `up` did.
#[derive(Debug, Clone)]
pub enum UpOutcome {
    Started(LabStatus),
    AlreadyUp(LabStatus),
}

/// The emulator to run: `explicit`, else scripts/moto.sh's, else `moto_server` on PATH.
pub fn find_emulator(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        if path.is_file() {
            return Ok(path.to_path_buf());
        }
        bail!("the emulator {} does not exist", path.display());
    }
    if Path::new(DEFAULT_EMULATOR).is_file() {
        return Ok(PathBuf::from(DEFAULT_EMULATOR));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("moto_server"))
        .find(|candidate| candidate.is_file())
        .context(
            "moto_server (the AWS emulator) not found: run scripts/moto.sh, which installs it \
             into /var/tmp/rigger-moto-venv, or pass --emulator PATH",
        )
}

/// Checks what a lab needs of this machine, saying what to install or do.
fn check_machine() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab needs root (network namespaces, mounts, systemd-nspawn): run it with sudo");
    }
    for (program, package) in [
        ("systemd-nspawn", "systemd-container"),
        ("ip", "iproute2"),
        ("sysctl", "procps"),
    ] {
        let path = std::env::var_os("PATH").unwrap_or_default();
        if !std::env::split_paths(&path).any(|dir| dir.join(program).is_file()) {
            bail!(
                "{program} is not installed: `apt-get install {package}` (scripts/install-packages.sh does)"
            );
        }
    }
    if sys::cgroup_roots().is_empty() {
        bail!("no cgroup hierarchy systemd can run in is mounted under /sys/fs/cgroup");
    }
    Ok(())
}

/// Starts the lab, or says it is up.
pub async fn up(
    lab: &Lab,
    options: &UpOptions,
    progress: &dyn Progress,
) -> anyhow::Result<UpOutcome> {
    check_machine()?;
    sys::create_trusted_dir(&lab.state, 0o700)?;
    // One `up` or `down` at a time.
    let _lock = sys::lock_exclusive(&lab.lock_file())?;
    let current = status(lab)?;
    if current.state == "up" {
        return Ok(UpOutcome::AlreadyUp(current));
    }
    let built = |flavor: Flavor| {
        image::find(&lab.images, flavor).with_context(|| {
            format!(
                "no {flavor} lab image in {} for this rigger: build the lab's images with `rigger lab image` (a few minutes, once)",
                lab.images.display()
            )
        })
    };
    let (stock, image) = (built(Flavor::Stock)?, built(Flavor::Baked)?);
    sys::check_trusted_dir(&lab.images)?;
    if !current.leftovers.is_empty() {
        progress.report(&format!(
            "cleaning up what an earlier lab left: {}",
            current.leftovers.join(", ")
        ));
    }
    sweep(lab).await?;
    forget(lab)?;

    status::write(&lab.amis_file(), &image::emulator_amis(&[&stock, &image]))?;
    let port = free_port(None)?;
    let emulator_url = format!("http://127.0.0.1:{port}");
    // The front's, which the runner listens on.
    let endpoint = format!("http://127.0.0.1:{}", free_port(Some(port))?);
    let mut env = base_env();
    env.insert(
        "MOTO_AMIS_PATH".to_owned(),
        lab.amis_file().display().to_string(),
    );
    let emulator = process::spawn(&ProcessSpec {
        name: "lab emulator".to_owned(),
        program: options.emulator.clone(),
        args: vec![
            "-H".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            port.to_string(),
        ],
        env,
        cwd: Some(lab.state.clone()),
        user: None,
        log_path: lab.emulator_log(),
        pid_path: lab.emulator_pid_file(),
        stop_signal: Signal::SIGTERM,
        stop_timeout: Duration::from_secs(10),
    })
    .await
    .context("starting the emulator")?;
    progress.report(&format!(
        "emulator started (pid {}, {emulator_url}, log {})",
        emulator.pid(),
        lab.emulator_log().display()
    ));
    let emulator_record = emulator.record();
    drop(emulator);
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if !emulator_record.is_alive() {
            bail!(
                "the emulator exited before listening; its log ends with:\n  {}",
                process::log_tail(&lab.emulator_log(), 15).join("\n  ")
            );
        }
        if started.elapsed() > START_TIMEOUT {
            bail!(
                "the emulator did not listen on {emulator_url} within {} s",
                START_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    status::write(
        &lab.settings_file(),
        &Settings {
            endpoint: endpoint.clone(),
            emulator: emulator_url.clone(),
            region: options.region.clone(),
            ami: image.ami_id.clone(),
            image_hash: image.hash.clone(),
            image_rootfs: image.rootfs.display().to_string(),
            stock_ami: stock.ami_id.clone(),
            stock_image_rootfs: stock.rootfs.display().to_string(),
        },
    )?;
    let Some((program, args)) = options.runner.split_first() else {
        bail!("no runner command given");
    };
    let mut env = base_env();
    if let Ok(filter) = std::env::var("RUST_LOG") {
        env.insert("RUST_LOG".to_owned(), filter);
    }
    let runner = process::spawn(&ProcessSpec {
        name: "lab runner".to_owned(),
        program: PathBuf::from(program),
        args: args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        env,
        cwd: Some(lab.state.clone()),
        user: None,
        log_path: lab.runner_log(),
        pid_path: lab.runner_pid_file(),
        stop_signal: Signal::SIGTERM,
        stop_timeout: RUNNER_STOP_TIMEOUT,
    })
    .await
    .context("starting the lab's runner")?;
    let runner_record = runner.record();
    drop(runner);
    progress.report(&format!(
        "runner started (pid {}, log {})",
        runner_record.pid,
        lab.runner_log().display()
    ));
    loop {
        let reported: Option<RunnerStatus> = status::read(&lab.status_file()).unwrap_or(None);
        if let Some(reported) = reported.filter(|s| s.pid == runner_record.pid) {
            match reported.phase {
                Phase::Ready => break,
                Phase::Failed => bail!(
                    "the lab did not start: {}\n(runner log: {}; `rigger lab down` cleans up)",
                    reported.message,
                    lab.runner_log().display()
                ),
                _ => {}
            }
        }
        if !runner_record.is_alive() {
            bail!(
                "the runner exited before the lab was ready; its log ends with:\n  {}\n(`rigger lab down` cleans up)",
                process::log_tail(&lab.runner_log(), 15).join("\n  ")
            );
        }
        if started.elapsed() > START_TIMEOUT {
            bail!(
                "the lab was not ready within {} s (runner log: {})",
                START_TIMEOUT.as_secs(),
                lab.runner_log().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(UpOutcome::Started(status(lab)?))
}

/// Stops everything the lab started and removes what it made; fails naming what is left.
/// Returns what had to be cleaned up after a runner that did not (or could not) do it.
pub async fn down(lab: &Lab, progress: &dyn Progress) -> anyhow::Result<Vec<String>> {
    check_machine()?;
    if !lab.state.is_dir() {
        return Ok(Vec::new());
    }
    sys::check_trusted_dir(&lab.state)?;
    let _lock = sys::lock_exclusive(&lab.lock_file())?;
    if let Some(runner) = PidRecord::read(&lab.runner_pid_file()).filter(PidRecord::is_alive) {
        progress.report(&format!(
            "stopping the runner (pid {}) and its machines",
            runner.pid
        ));
        process::stop(&runner, Signal::SIGTERM, RUNNER_STOP_TIMEOUT).await;
    }
    if let Some(emulator) = PidRecord::read(&lab.emulator_pid_file()).filter(PidRecord::is_alive) {
        progress.report(&format!("stopping the emulator (pid {})", emulator.pid));
        process::stop(&emulator, Signal::SIGTERM, Duration::from_secs(10)).await;
    }
    let left_behind = leftovers(lab);
    if !left_behind.is_empty() {
        progress.report(&format!("cleaning up: {}", left_behind.join(", ")));
    }
    sweep(lab).await?;
    let remaining = leftovers(lab);
    if !remaining.is_empty() {
        bail!("the lab could not remove: {}", remaining.join(", "));
    }
    forget(lab)?;
    Ok(left_behind)
}

/// The lab's state, as `rigger lab status` prints it.
pub fn status(lab: &Lab) -> anyhow::Result<LabStatus> {
    let settings: Option<Settings> = status::read(&lab.settings_file())?;
    let emulator = PidRecord::read(&lab.emulator_pid_file()).filter(PidRecord::is_alive);
    let runner = PidRecord::read(&lab.runner_pid_file()).filter(PidRecord::is_alive);
    let reported: Option<RunnerStatus> = status::read(&lab.status_file())?
        .filter(|s: &RunnerStatus| runner.as_ref().is_some_and(|r| r.pid == s.pid));
    let running = emulator.is_some()
        && runner.is_some()
        && reported
            .as_ref()
            .is_some_and(|s| matches!(s.phase, Phase::Ready | Phase::Starting));
    let leftovers = if running { Vec::new() } else { leftovers(lab) };
    let state = if running {
        "up"
    } else if leftovers.is_empty() {
        "down"
    } else {
        "broken"
    };
    let amis: BTreeMap<String, String> = match (&settings, running) {
        (Some(settings), true) => [
            (Flavor::Stock, &settings.stock_ami),
            (Flavor::Baked, &settings.ami),
        ]
        .into_iter()
        .filter(|(_, ami)| !ami.is_empty())
        .map(|(flavor, ami)| (flavor.to_string(), ami.clone()))
        .collect(),
        _ => Flavor::ALL
            .into_iter()
            .filter_map(|flavor| {
                image::find(&lab.images, flavor).map(|image| (flavor.to_string(), image.ami_id))
            })
            .collect(),
    };
    let ami = amis.get(Flavor::Baked.as_str()).cloned();
    Ok(LabStatus {
        state: state.to_owned(),
        endpoint: settings
            .as_ref()
            .filter(|_| running)
            .map(|s| s.endpoint.clone()),
        ami,
        amis,
        region: settings
            .as_ref()
            .filter(|_| running)
            .map(|s| s.region.clone()),
        namespace: lab.namespace(),
        network: reported.as_ref().and_then(|s| s.network.clone()),
        lab_address: reported.as_ref().and_then(|s| s.lab_address.clone()),
        bastion: reported.as_ref().and_then(|s| s.bastion.clone()),
        emulator_pid: emulator.map(|r| r.pid),
        runner_pid: runner.map(|r| r.pid),
        runner_phase: reported.as_ref().map(|s| s.phase),
        message: reported.as_ref().map(|s| s.message.clone()),
        load_balancers: reported
            .as_ref()
            .map(|s| s.load_balancers.clone())
            .unwrap_or_default(),
        machines: reported.map(|s| s.machines).unwrap_or_default(),
        leftovers,
    })
}

/// Everything of this lab that exists on the system: live processes it recorded, its network
/// namespaces, mounts under its state, its cgroups.
pub fn leftovers(lab: &Lab) -> Vec<String> {
    let mut found = Vec::new();
    if lab.state.is_dir() {
        for record in process::live_records(&lab.state) {
            found.push(format!("process {} (pid {})", record.name, record.pid));
        }
    }
    for name in net::namespaces() {
        if lab.owns_namespace(&name) {
            found.push(format!("network namespace {name}"));
        }
    }
    for point in sys::mounts_under(&lab.state) {
        found.push(format!("mount {}", point.display()));
    }
    for root in sys::cgroup_roots() {
        let dir = root.join(lab.cgroup());
        if dir.exists() {
            found.push(format!("cgroup {}", dir.display()));
        }
    }
    for device in crate::volume::loop_devices_under(&lab.state) {
        found.push(format!("loop device {device}"));
    }
    found
}

/// Removes whatever of the lab exists: stops recorded processes, kills what is left in its
/// cgroups, unmounts, deletes its namespaces. Safe to run at any time the lab is not up.
async fn sweep(lab: &Lab) -> anyhow::Result<()> {
    if lab.state.is_dir() {
        process::stop_leftovers(&lab.state, Duration::from_secs(30)).await;
    }
    for root in sys::cgroup_roots() {
        sys::remove_cgroup_tree(&root.join(lab.cgroup()), Duration::from_secs(10))?;
    }
    for point in sys::mounts_under(&lab.state) {
        sys::unmount(&point)?;
    }
    crate::volume::sweep(&lab.state.join("volumes")).await;
    for name in net::namespaces() {
        if lab.owns_namespace(&name) {
            net::remove_namespace(&name).await?;
        }
    }
    Ok(())
}

/// Removes a stopped lab's records, machines' disks and the images made in it; keeps the
/// logs.
fn forget(lab: &Lab) -> anyhow::Result<()> {
    sys::remove_tree(&lab.machines_dir())?;
    sys::remove_tree(&lab.created_images_dir())?;
    for file in [lab.settings_file(), lab.status_file(), lab.amis_file()] {
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(error).with_context(|| format!("removing {}", file.display()));
            }
        }
    }
    Ok(())
}

fn base_env() -> std::collections::BTreeMap<String, String> {
    [("PATH".to_owned(), process::DEFAULT_PATH.to_owned())]
        .into_iter()
        .collect()
}

/// A loopback port free now, other than `taken`.
fn free_port(taken: Option<u16>) -> anyhow::Result<u16> {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free loopback port for the lab")?
            .port();
        if Some(port) != taken {
            return Ok(port);
        }
    }
}
