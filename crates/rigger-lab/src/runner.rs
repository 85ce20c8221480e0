//! The runner: the long-running process (`rigger lab run`, started detached by `rigger lab
//! up`) that makes the emulator's instances real machines.
//!
//! It sets up the lab's network for the emulator's default VPC ([`crate::net`]), serves the
//! metadata service in it ([`crate::imds`]), the front to the emulator ([`crate::front`]:
//! HTTPS for machines, the lab's endpoint on this machine) and the resolver that sends
//! machines' AWS names to it ([`crate::dns`]), then polls DescribeInstances and converges: a
//! pending or running instance gets a machine ([`crate::machine`]), a stopping or stopped one
//! has its machine stopped (its disk kept), a terminated one (or one the emulator forgot) has
//! its machine removed. An instance the lab cannot run (not the lab's AMI, an address outside
//! the lab's network) is reported `failed` with why. A machine that reboots boots its disk
//! again; one that powers off has its instance stopped (or terminated, as the instance's
//! shutdown behaviour says), as EC2 does; one that dies otherwise is reported `exited`. Every
//! change is written to `status.json` ([`crate::status`]).
//!
//! SIGTERM (or SIGINT) stops every machine, removes the network, reports `stopped` and exits.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rigger_aws::lab::LabInstance;
use rigger_aws::{Clients, Connection};
use rigger_local::process::Supervised;
use tokio::signal::unix::{SignalKind, signal};

use crate::balancer::{BalancerEdge, Balancers};
use crate::bastion::Bastion;
use crate::dns::LabZone;
use crate::front::{Edges, Front};
use crate::images::{ConsoleEdge, ImageEdge, ImageState, LabImages, Source};
use crate::imds::{IssuedCredentials, MachineMetadata, Machines, Profile, Service};
use crate::layout::{Lab, is_instance_id};
use crate::machine::{self, MachineSpec};
use crate::net::{self, Cidr, Vpc as _};
use crate::pki::Pki;
use crate::status::{
    self, BastionStatus, MachineState, MachineStatus, Phase, RunnerStatus, Settings,
};
use crate::volume::Volumes;

/// How often the emulator is asked for its instances.
pub const POLL: Duration = Duration::from_millis(500);
/// How long the credentials handed to machines live.
const CREDENTIALS_SECONDS: i32 = 6 * 3600;
/// Credentials are renewed when less than this is left.
const CREDENTIALS_RENEWAL: i64 = 15 * 60;
/// How often the emulator's volumes are read.
const VOLUMES_EVERY: Duration = Duration::from_secs(1);
/// How often the emulator's load balancers are read.
const BALANCERS_EVERY: Duration = Duration::from_secs(1);
/// How often the emulator's key pairs are read for the bastion.
const KEY_PAIRS_EVERY: Duration = Duration::from_secs(2);
/// How often the machines' memory is measured for the status.
const MEMORY_EVERY: Duration = Duration::from_secs(5);
/// Where the package mirror fetches Debian's archive from: the name this machine's own apt
/// uses (Debian's CDN), resolved and reached from this machine's network, never from a
/// machine's.
const ARCHIVE_UPSTREAM: &str = "deb.debian.org";

/// The credentials the runner uses with the emulator (which checks none), straight to it:
/// the lab's own calls are not the front's to answer.
pub fn emulator_connection(settings: &Settings) -> Connection {
    Connection {
        region: settings.region.clone(),
        endpoint_url: Some(settings.emulator.clone()),
        max_attempts: Some(1),
        static_credentials: Some(("testing".into(), "testing".into())),
    }
}

/// One instance's machine, as the runner tracks it.
struct Entry {
    instance: LabInstance,
    state: MachineState,
    detail: Option<String>,
    process: Option<Supervised>,
    hostname: Option<String>,
    memory: Option<u64>,
}

/// Runs the lab until SIGTERM. The status file says how it went.
pub async fn run(lab: Lab) -> anyhow::Result<()> {
    let settings: Settings = status::read(&lab.settings_file())?
        .context("the lab has no settings (lab.json): start it with `rigger lab up`")?;
    if settings.emulator.is_empty() {
        bail!(
            "the lab's settings (lab.json) were written by an older rigger: `rigger lab down`, then `rigger lab up`"
        );
    }
    let volumes = Volumes::new(&lab.state);
    let balancers = Arc::new(Balancers::new(&lab));
    // The images the lab was started with (baked and stock); CreateImage adds more
    // ([`crate::images`]).
    let bases: Vec<(String, PathBuf)> = [
        (&settings.ami, &settings.image_rootfs),
        (&settings.stock_ami, &settings.stock_image_rootfs),
    ]
    .into_iter()
    .filter(|(ami, _)| !ami.is_empty())
    .map(|(ami, rootfs)| (ami.clone(), PathBuf::from(rootfs)))
    .collect();
    let images = Arc::new(LabImages::new(&lab, &bases));
    let mut runner = Runner {
        status: RunnerStatus {
            pid: std::process::id() as i32,
            phase: Phase::Starting,
            message: "setting up the network".to_owned(),
            network: None,
            lab_address: None,
            bastion: None,
            machines: Vec::new(),
            load_balancers: Vec::new(),
        },
        machines: Arc::new(RwLock::new(HashMap::new())),
        entries: BTreeMap::new(),
        clients: Clients::connect(&emulator_connection(&settings)).await,
        lab,
        settings,
        next_port: 0,
        written: None,
        bastion: None,
        keys_read: None,
        edges: Edges::new(),
        volumes,
        volumes_read: None,
        balancers,
        balancers_read: None,
        images,
    };
    let mut terminate = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    runner.write();
    let vpc = match runner.set_up().await {
        Ok(vpc) => vpc,
        Err(error) => {
            runner.status.phase = Phase::Failed;
            runner.status.message = format!("{error:#}");
            runner.tear_down().await;
            runner.status.phase = Phase::Failed;
            runner.status.message = format!("{error:#}");
            runner.write();
            return Err(error);
        }
    };
    runner.status.phase = Phase::Ready;
    runner.status.message = "following the emulator's instances".to_owned();
    runner.write();
    tracing::info!(network = %vpc, "lab ready");
    let mut memory_measured = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
        match rigger_aws::lab::instances(&runner.clients).await {
            Ok(instances) => {
                runner.converge(instances, vpc).await;
                runner.converge_images().await;
                runner.status.message = "following the emulator's instances".to_owned();
            }
            Err(error) => {
                tracing::warn!(%error, "DescribeInstances");
                runner.status.message = format!("the emulator did not answer: {error}");
            }
        }
        runner.renew_credentials().await;
        runner.authorize_key_pairs().await;
        runner.converge_volumes().await;
        runner.converge_balancers().await;
        if memory_measured.elapsed() >= MEMORY_EVERY {
            runner.measure_memory();
            memory_measured = Instant::now();
        }
        runner.write();
    }
    tracing::info!("stopping every machine");
    runner.status.phase = Phase::Stopping;
    runner.status.message = "stopping every machine".to_owned();
    runner.write();
    runner.tear_down().await;
    runner.status.phase = Phase::Stopped;
    runner.status.message = "stopped".to_owned();
    runner.write();
    Ok(())
}

struct Runner {
    lab: Lab,
    settings: Settings,
    clients: Clients,
    status: RunnerStatus,
    machines: Machines,
    entries: BTreeMap<String, Entry>,
    /// The next bridge port number.
    next_port: u64,
    /// The status last written, to write only changes.
    written: Option<RunnerStatus>,
    /// The jump host, its sshd and its forwarder (dropped: stopped).
    bastion: Option<(Arc<Bastion>, Supervised, tokio::task::JoinHandle<()>)>,
    /// When the key pairs were last read for the bastion.
    keys_read: Option<Instant>,
    /// The parts of the lab that answer some of the emulator's calls themselves, which the
    /// front consults ([`crate::front::Edge`]).
    edges: Edges,
    /// The emulator's EBS volumes as loop devices in machines.
    volumes: Volumes,
    /// When the volumes were last read.
    volumes_read: Option<Instant>,
    /// The emulator's load balancers as HAProxy.
    balancers: Arc<Balancers>,
    /// When the load balancers were last read.
    balancers_read: Option<Instant>,
    /// The AMIs machines boot from: the lab's image and those made of its instances.
    images: Arc<LabImages>,
}

/// systemd-nspawn's exit status when the machine rebooted.
const NSPAWN_REBOOT: i32 = 133;

/// How a machine's `systemd-nspawn` ended without being asked to.
enum Ending {
    Reboot,
    Poweroff,
    Crash(String),
}

/// What an instance's state asks of its machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Stop,
    Remove,
}

fn want(instance_state: &str) -> Want {
    match instance_state {
        "pending" | "running" => Want::Run,
        "shutting-down" | "terminated" => Want::Remove,
        _ => Want::Stop,
    }
}

/// The layers of `instance`'s AMI: `Ok(None)` while the lab is still making that image,
/// `Err` when it is not one machines of this lab can boot.
fn layers(instance: &LabInstance, images: &LabImages) -> Result<Option<Vec<PathBuf>>, String> {
    let Some(ami) = instance.image_id.as_deref() else {
        return Err("it has no AMI".to_owned());
    };
    match images.state(ami) {
        Some(ImageState::Ready(layers)) => Ok(Some(layers)),
        Some(ImageState::Making) => Ok(None),
        Some(ImageState::Failed(why)) => Err(format!("its AMI {ami} cannot be booted: {why}")),
        None => Err(format!(
            "its AMI {ami} is not the lab's image nor one made of the lab's instances; launch \
             instances from the lab's AMI (`rigger lab status`)"
        )),
    }
}

/// Why `instance` cannot be a machine of this lab, if it cannot.
/// A listener on `address` in network namespace `namespace`, for the runner's tokio runtime.
fn listen_in(namespace: &str, address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = crate::sys::in_namespace(namespace, move || {
        let listener = std::net::TcpListener::bind(address)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
    .with_context(|| format!("listening on {address} in the lab's namespace"))?;
    Ok(tokio::net::TcpListener::from_std(listener)?)
}

fn refusal(instance: &LabInstance, vpc: Cidr) -> Result<Ipv4Addr, String> {
    if instance.subnet_id.is_none() {
        return Err(
            "it was launched without a subnet, so the emulator gave it an address outside \
             every VPC (AWS would have used a default subnet): launch it into a subnet of the \
             default VPC (DescribeSubnets, filter default-for-az=true)"
                .to_owned(),
        );
    }
    let address: Ipv4Addr = instance
        .private_address
        .as_deref()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| "it has no private IPv4 address".to_owned())?;
    if let Some(why) = vpc.refuse_machine_address(address) {
        return Err(format!(
            "{why}: the lab carries the emulator's default VPC only"
        ));
    }
    Ok(address)
}

impl Runner {
    async fn set_up(&mut self) -> anyhow::Result<Cidr> {
        let vpc_text = rigger_aws::lab::default_vpc_cidr(&self.clients)
            .await?
            .context("the emulator has no default VPC in the lab's region")?;
        let vpc: Cidr = vpc_text
            .parse()
            .with_context(|| format!("the emulator's default VPC {vpc_text:?}"))?;
        if !vpc.is_private() {
            bail!("the emulator's default VPC {vpc} is not private address space");
        }
        let namespace = self.lab.namespace();
        net::remove_namespace(&namespace).await?;
        net::create_lab(&namespace, vpc).await?;
        self.status.network = Some(vpc.to_string());
        self.status.lab_address = Some(vpc.router().to_string());
        self.serve_aws(vpc)
            .context("serving the lab's AWS API (front, certificates, resolver)")?;
        let listener = listen_in(&namespace, SocketAddr::from((net::METADATA_ADDRESS, 80)))?;
        tokio::spawn(crate::imds::serve(
            listener,
            Arc::new(Service::new(Arc::clone(&self.machines))),
        ));
        let bastion = Arc::new(Bastion::prepare(&self.lab, vpc.router())?);
        let listener = bastion.listen()?;
        let sshd = bastion
            .start(&self.lab, &self.lab.state.join("bastion.log"))
            .await?;
        let forwarder = tokio::spawn(Arc::clone(&bastion).forward(listener));
        self.status.bastion = Some(BastionStatus {
            target: bastion.target(),
            host_key: bastion.host_key.clone(),
            known_hosts_line: bastion.known_hosts_line(),
        });
        self.bastion = Some((bastion, sshd, forwarder));
        self.authorize_key_pairs().await;
        Ok(vpc)
    }

    /// The lab's AWS API: the front to the emulator, in HTTPS on its address in the lab's
    /// namespace with a certificate of the lab's CA (machines reach it at the AWS host names)
    /// and in plain HTTP on this machine's loopback (the lab's endpoint); the package mirror,
    /// in plain HTTP on the front's address; and the VPC's resolver, which sends every
    /// `*.amazonaws.com` name and the archive's names to the front.
    fn serve_aws(&mut self, vpc: Cidr) -> anyhow::Result<()> {
        let pki = Pki::of(&self.lab);
        pki.ensure_ca(&self.lab.id)?;
        pki.issue_front_certificate(&self.settings.region)?;
        let tls = pki.front_tls()?;
        let emulator = loopback_url_address(&self.settings.emulator)?;
        let endpoint = loopback_url_address(&self.settings.endpoint)?;
        self.edges
            .register(Arc::new(BalancerEdge(Arc::clone(&self.balancers))));
        self.edges
            .register(Arc::new(ImageEdge(Arc::clone(&self.images))));
        self.edges.register(Arc::new(ConsoleEdge(self.lab.clone())));
        let front = Front::new(emulator, self.edges.clone());
        let namespace = self.lab.namespace();

        let listener = listen_in(&namespace, SocketAddr::from((vpc.front(), 443)))?;
        tokio::spawn(Arc::clone(&front).serve_tls(listener, tls));
        let listener = std::net::TcpListener::bind(endpoint)
            .and_then(|listener| {
                listener.set_nonblocking(true)?;
                Ok(listener)
            })
            .with_context(|| {
                format!(
                    "listening on {endpoint}, the lab's endpoint (something took the port after \
                     `rigger lab up` chose it: `rigger lab down`, then `rigger lab up` again)"
                )
            })?;
        tokio::spawn(front.serve_plain(tokio::net::TcpListener::from_std(listener)?));

        // The package mirror: plain HTTP on the front's address, where the resolver sends the
        // names of Debian's archive.
        let listener = listen_in(
            &namespace,
            SocketAddr::from((vpc.front(), crate::front::ARCHIVE_PORT)),
        )?;
        tokio::spawn(Front::debian_archive(ARCHIVE_UPSTREAM).serve_plain(listener));

        let zone: Arc<dyn crate::dns::Zone> = Arc::new(LabZone {
            front: vpc.front(),
            machines: Arc::clone(&self.machines),
        });
        let resolver = SocketAddr::from((net::RESOLVER_ADDRESS, crate::dns::PORT));
        let (udp, tcp) = crate::sys::in_namespace(&namespace, move || {
            let udp = std::net::UdpSocket::bind(resolver)?;
            udp.set_nonblocking(true)?;
            let tcp = std::net::TcpListener::bind(resolver)?;
            tcp.set_nonblocking(true)?;
            Ok((udp, tcp))
        })
        .with_context(|| format!("listening on {resolver} in the lab's namespace"))?;
        tokio::spawn(crate::dns::serve_udp(
            tokio::net::UdpSocket::from_std(udp)?,
            Arc::clone(&zone),
        ));
        tokio::spawn(crate::dns::serve_tcp(
            tokio::net::TcpListener::from_std(tcp)?,
            zone,
        ));
        Ok(())
    }

    /// Makes the layers of images the emulator made of the lab's instances (every round: a
    /// machine may wait for one).
    async fn converge_images(&mut self) {
        let Some(listed) = crate::images::emulator_images(&self.clients).await else {
            return;
        };
        let entries = &self.entries;
        let lab = &self.lab;
        self.images
            .converge(&listed, |id| {
                entries.get(id).map(|entry| Source {
                    instance_state: entry.instance.state.as_str(),
                    machine_running: entry.state == MachineState::Running
                        || machine::running(lab, id).is_some(),
                    image_id: entry.instance.image_id.as_deref(),
                })
            })
            .await;
    }

    /// Serves every load balancer (classic, and application with its target groups) with
    /// HAProxy (read every second).
    async fn converge_balancers(&mut self) {
        if self
            .balancers_read
            .is_some_and(|at| at.elapsed() < BALANCERS_EVERY)
        {
            return;
        }
        self.balancers_read = Some(Instant::now());
        let classic = match rigger_aws::lab::classic_load_balancers(&self.clients).await {
            Ok(lbs) => lbs,
            Err(error) => {
                tracing::warn!(%error, "DescribeLoadBalancers");
                return;
            }
        };
        let (application, target_groups) =
            match rigger_aws::lab::application_load_balancers(&self.clients).await {
                Ok(read) => read,
                Err(error) => {
                    tracing::warn!(%error, "application load balancers");
                    return;
                }
            };
        let emulated = crate::balancer::Emulated {
            classic,
            application,
            target_groups,
        };
        let addresses: HashMap<String, Ipv4Addr> = self
            .entries
            .iter()
            .filter(|(_, e)| e.state == MachineState::Running)
            .filter_map(|(id, e)| {
                Some((
                    id.clone(),
                    e.instance.private_address.as_deref()?.parse().ok()?,
                ))
            })
            .collect();
        let pki = Pki::of(&self.lab);
        if let Err(error) = self.balancers.converge(emulated, &addresses, &pki).await {
            tracing::warn!(error = %format!("{error:#}"), "load balancers");
        }
        self.status.load_balancers = self.balancers.status();
    }

    /// Plugs every attached volume into its instance's running machine (read every second).
    async fn converge_volumes(&mut self) {
        if self
            .volumes_read
            .is_some_and(|at| at.elapsed() < VOLUMES_EVERY)
        {
            return;
        }
        self.volumes_read = Some(Instant::now());
        let volumes = match rigger_aws::lab::volumes(&self.clients).await {
            Ok(volumes) => volumes,
            Err(error) => {
                tracing::warn!(%error, "DescribeVolumes");
                return;
            }
        };
        // A machine whose PID 1 is not there yet is starting (its volumes bound at boot).
        let machines: HashMap<String, Option<i32>> = self
            .entries
            .iter()
            .filter(|(_, e)| e.state == MachineState::Running)
            .filter_map(|(id, e)| {
                let nspawn = e.process.as_ref()?.pid();
                Some((id.clone(), crate::volume::machine_init(nspawn)))
            })
            .collect();
        self.volumes.converge(&volumes, &machines).await;
    }

    /// Lets the emulator's key pairs through the bastion (read every few seconds: a key pair
    /// imported now is usable a moment later, as the machines launched with it are).
    async fn authorize_key_pairs(&mut self) {
        if self
            .keys_read
            .is_some_and(|at| at.elapsed() < KEY_PAIRS_EVERY)
        {
            return;
        }
        let Some((bastion, _, _)) = &self.bastion else {
            return;
        };
        self.keys_read = Some(Instant::now());
        match rigger_aws::lab::public_keys(&self.clients).await {
            Ok(keys) => match bastion.authorize(&keys) {
                Ok(true) => tracing::info!(keys = keys.len(), "bastion: key pairs authorized"),
                Ok(false) => {}
                Err(error) => tracing::warn!(error = %format!("{error:#}"), "bastion: authorizing"),
            },
            Err(error) => tracing::warn!(%error, "bastion: DescribeKeyPairs"),
        }
    }

    /// Stops every machine (concurrently) and removes the network and the lab's cgroups.
    async fn tear_down(&mut self) {
        if let Some((_, mut sshd, forwarder)) = self.bastion.take() {
            forwarder.abort();
            rigger_local::process::stop_supervised(
                &mut sshd,
                nix::sys::signal::Signal::SIGTERM,
                Duration::from_secs(5),
            )
            .await;
        }
        self.status.bastion = None;
        let mut tasks = tokio::task::JoinSet::new();
        for (id, entry) in std::mem::take(&mut self.entries) {
            let lab = self.lab.clone();
            tasks.spawn(async move {
                let result = machine::stop(&lab, &id, machine::STOP_TIMEOUT).await;
                drop(entry);
                (id, result)
            });
        }
        for (id, result) in tasks.join_all().await {
            if let Err(error) = result {
                tracing::warn!(%id, error = %format!("{error:#}"), "stopping a machine");
            }
        }
        self.balancers.stop().await;
        self.volumes.tear_down().await;
        self.machines.write().expect("metadata lock").clear();
        if let Err(error) = net::remove_namespace(&self.lab.namespace()).await {
            tracing::warn!(error = %format!("{error:#}"), "removing the lab's namespace");
        }
        for root in crate::sys::cgroup_roots() {
            let dir = root.join(self.lab.cgroup());
            if let Err(error) = crate::sys::remove_cgroup_tree(&dir, Duration::from_secs(10)) {
                tracing::warn!(error = %format!("{error:#}"), "removing the lab's cgroups");
            }
        }
        self.status.machines.clear();
        self.status.load_balancers.clear();
    }

    /// One round: every instance's machine towards what its state asks.
    async fn converge(&mut self, instances: Vec<LabInstance>, vpc: Cidr) {
        let mut listed: HashMap<String, LabInstance> = instances
            .into_iter()
            .filter(|i| is_instance_id(&i.id))
            .map(|i| (i.id.clone(), i))
            .collect();
        // Machines whose process ended by itself: a reboot inside boots the same disk again
        // (systemd-nspawn exits with 133 then), a poweroff does to the instance what EC2 does
        // (stop it, or terminate it if the instance says so), anything else is reported.
        let mut ended: Vec<(String, Ending)> = Vec::new();
        for (id, entry) in &mut self.entries {
            if entry.state != MachineState::Running {
                continue;
            }
            let exited = entry
                .process
                .as_mut()
                .and_then(|p| p.try_wait().ok().flatten());
            if let Some(status) = exited {
                entry.process = None;
                let ending = match status.code() {
                    Some(NSPAWN_REBOOT) => Ending::Reboot,
                    Some(0) => Ending::Poweroff,
                    _ => {
                        let console = rigger_local::process::log_tail(
                            &self.lab.machine_dir(id).join("console.log"),
                            3,
                        )
                        .join(" | ");
                        Ending::Crash(format!(
                            "systemd-nspawn exited ({status}); console: {console}"
                        ))
                    }
                };
                ended.push((id.clone(), ending));
            }
        }
        for (id, ending) in ended {
            self.forget_metadata(&id);
            if let Err(error) = machine::stop(&self.lab, &id, machine::STOP_TIMEOUT).await {
                tracing::warn!(%id, error = %format!("{error:#}"), "cleaning up after a machine");
            }
            let (state, detail) = match ending {
                Ending::Reboot => {
                    tracing::info!(%id, "machine rebooted");
                    (MachineState::Stopped, None)
                }
                Ending::Poweroff => {
                    match rigger_aws::lab::shut_down_from_inside(&self.clients, &id).await {
                        Ok(behaviour) => {
                            tracing::info!(%id, behaviour, "machine powered off");
                            // What the emulator says now, not what it said before.
                            if let Some(instance) = listed.get_mut(&id) {
                                instance.state = if behaviour == "terminate" {
                                    "shutting-down".to_owned()
                                } else {
                                    "stopping".to_owned()
                                };
                            }
                            (MachineState::Stopped, None)
                        }
                        Err(error) => (
                            MachineState::Exited,
                            Some(format!(
                                "it powered off, and telling the emulator failed: {error}"
                            )),
                        ),
                    }
                }
                Ending::Crash(detail) => {
                    tracing::warn!(%id, %detail, "machine exited");
                    // As EC2's failed status checks make Auto Scaling replace the instance.
                    let group = self
                        .entries
                        .get(&id)
                        .and_then(|e| e.instance.autoscaling_group.clone());
                    let detail = match group {
                        Some(group) => {
                            match rigger_aws::lab::replace_in_group(&self.clients, &id).await {
                                Ok(()) => {
                                    tracing::info!(%id, %group, "reported unhealthy; the group replaces it");
                                    format!("{detail}; replaced by its group {group}")
                                }
                                Err(error) => format!(
                                    "{detail}; reporting it to its group {group} failed: {error}"
                                ),
                            }
                        }
                        None => detail,
                    };
                    (MachineState::Exited, Some(detail))
                }
            };
            if let Some(entry) = self.entries.get_mut(&id) {
                entry.state = state;
                entry.detail = detail;
            }
        }
        // Gone from the emulator, or terminated: removed.
        let mut removals = Vec::new();
        for id in self.entries.keys() {
            let gone = listed
                .get(id)
                .is_none_or(|i| want(&i.state) == Want::Remove);
            if gone {
                removals.push(id.clone());
            }
        }
        for id in removals {
            let entry = self.entries.remove(&id);
            self.forget_metadata(&id);
            tracing::info!(%id, "removing machine");
            if let Err(error) = machine::remove(&self.lab, &id, machine::STOP_TIMEOUT).await {
                tracing::warn!(%id, error = %format!("{error:#}"), "removing a machine");
            }
            drop(entry);
        }
        // Starts and stops, concurrently.
        let mut starts = Vec::new();
        let mut stops = Vec::new();
        let mut ids: Vec<&String> = listed.keys().collect();
        ids.sort();
        for id in ids {
            let instance = &listed[id];
            let current = self.entries.get(id).map(|e| e.state);
            match (want(&instance.state), current) {
                (Want::Run, None | Some(MachineState::Stopped)) => starts.push(instance.clone()),
                (Want::Stop, Some(MachineState::Running)) => stops.push(id.clone()),
                (Want::Stop, Some(MachineState::Exited | MachineState::Failed)) => {
                    if let Some(entry) = self.entries.get_mut(id) {
                        entry.state = MachineState::Stopped;
                        entry.detail = None;
                    }
                }
                _ => {}
            }
            if let Some(entry) = self.entries.get_mut(id) {
                entry.instance = instance.clone();
            }
        }
        let mut stopping = tokio::task::JoinSet::new();
        for id in stops {
            self.forget_metadata(&id);
            let entry = self.entries.get_mut(&id).expect("listed above");
            let process = entry.process.take();
            let lab = self.lab.clone();
            tracing::info!(%id, "stopping machine");
            stopping.spawn(async move {
                let result = machine::stop(&lab, &id, machine::STOP_TIMEOUT).await;
                drop(process);
                (id, result)
            });
        }
        for (id, result) in stopping.join_all().await {
            if let Some(entry) = self.entries.get_mut(&id) {
                match result {
                    Ok(_) => {
                        entry.state = MachineState::Stopped;
                        entry.detail = None;
                    }
                    Err(error) => {
                        entry.state = MachineState::Failed;
                        entry.detail = Some(format!("stopping it failed: {error:#}"));
                    }
                }
            }
        }
        // The volumes attached to the machines that start are bound at boot.
        let attached = if starts.is_empty() {
            Vec::new()
        } else {
            rigger_aws::lab::volumes(&self.clients)
                .await
                .unwrap_or_else(|error| {
                    tracing::warn!(%error, "DescribeVolumes (their volumes are hot-plugged)");
                    Vec::new()
                })
        };
        let mut starting = tokio::task::JoinSet::new();
        for instance in starts {
            let address = match refusal(&instance, vpc) {
                Ok(address) => address,
                Err(why) => {
                    self.fail(instance, why);
                    continue;
                }
            };
            let lowers = match layers(&instance, &self.images) {
                Ok(Some(lowers)) => lowers,
                // Its image's layer is still being made: started in a later round.
                Ok(None) => continue,
                Err(why) => {
                    self.fail(instance, why);
                    continue;
                }
            };
            let taken = self.entries.iter().any(|(id, e)| {
                id != &instance.id
                    && e.state == MachineState::Running
                    && e.instance.private_address == instance.private_address
            });
            if taken {
                let why = format!("its address {address} is another running machine's");
                self.fail(instance, why);
                continue;
            }
            let spec = MachineSpec {
                instance_id: instance.id.clone(),
                address,
                vpc,
                hostname: machine::hostname(address),
                mac: net::mac_address(&instance.id),
                lowers,
                port_index: self.next_port,
                disks: self.volumes.boot_disks(&attached, &instance.id).await,
            };
            self.next_port += 1;
            let lab = self.lab.clone();
            let clients = self.clients.clone();
            let region = self.settings.region.clone();
            let machines = Arc::clone(&self.machines);
            tracing::info!(id = %instance.id, %address, "starting machine");
            starting.spawn(async move {
                let result = async {
                    let metadata = metadata(&clients, &instance, &spec, &region).await?;
                    machines
                        .write()
                        .expect("metadata lock")
                        .insert(address, metadata);
                    machine::start(&lab, &spec).await
                }
                .await;
                (instance, spec, result)
            });
        }
        for (instance, spec, result) in starting.join_all().await {
            match result {
                Ok(process) => {
                    self.entries.insert(
                        instance.id.clone(),
                        Entry {
                            instance,
                            state: MachineState::Running,
                            detail: None,
                            process: Some(process),
                            hostname: Some(spec.hostname),
                            memory: None,
                        },
                    );
                }
                Err(error) => {
                    self.forget_metadata(&instance.id);
                    let why = format!("starting it failed: {error:#}");
                    self.fail(instance, why);
                }
            }
        }
        self.status.machines = self
            .entries
            .iter()
            .map(|(id, entry)| MachineStatus {
                instance_id: id.clone(),
                address: entry.instance.private_address.clone(),
                state: entry.state,
                instance_state: entry.instance.state.clone(),
                hostname: entry.hostname.clone(),
                detail: entry.detail.clone(),
                pid: entry.process.as_ref().map(Supervised::pid),
                memory_pss_bytes: entry.memory,
            })
            .collect();
    }

    fn fail(&mut self, instance: LabInstance, why: String) {
        tracing::warn!(id = %instance.id, %why, "the lab cannot run this instance");
        self.entries.insert(
            instance.id.clone(),
            Entry {
                instance,
                state: MachineState::Failed,
                detail: Some(why),
                process: None,
                hostname: None,
                memory: None,
            },
        );
    }

    fn forget_metadata(&self, instance_id: &str) {
        self.machines
            .write()
            .expect("metadata lock")
            .retain(|_, m| m.instance_id != instance_id);
    }

    /// Renews credentials that expire within [`CREDENTIALS_RENEWAL`].
    async fn renew_credentials(&mut self) {
        let now = unix_now();
        let due: Vec<(Ipv4Addr, String, String)> = self
            .machines
            .read()
            .expect("metadata lock")
            .values()
            .filter_map(|m| {
                let profile = m.profile.as_ref()?;
                let fresh = m
                    .credentials
                    .as_ref()
                    .is_some_and(|c| c.credentials.expiration - now > CREDENTIALS_RENEWAL);
                (!fresh).then(|| (m.address, profile.arn.clone(), m.instance_id.clone()))
            })
            .collect();
        for (address, arn, instance_id) in due {
            match credentials(&self.clients, &arn, &instance_id).await {
                Ok(issued) => {
                    let mut machines = self.machines.write().expect("metadata lock");
                    // Unless another instance holds the address by now.
                    if let Some(m) = machines
                        .get_mut(&address)
                        .filter(|m| m.instance_id == instance_id)
                    {
                        m.credentials = issued;
                    }
                }
                Err(error) => tracing::warn!(%instance_id, %error, "renewing credentials"),
            }
        }
    }

    fn measure_memory(&mut self) {
        for entry in self.entries.values_mut() {
            entry.memory = entry
                .process
                .as_ref()
                .and_then(|p| machine::memory_pss_bytes(&p.record()));
        }
        for status in &mut self.status.machines {
            status.memory_pss_bytes = self.entries.get(&status.instance_id).and_then(|e| e.memory);
        }
    }

    fn write(&mut self) {
        if self.written.as_ref() == Some(&self.status) {
            return;
        }
        match status::write(&self.lab.status_file(), &self.status) {
            Ok(()) => self.written = Some(self.status.clone()),
            Err(error) => tracing::warn!(error = %format!("{error:#}"), "writing the status"),
        }
    }
}

/// The address of `url`, `http://127.0.0.1:PORT` (the emulator's, the lab's endpoint).
fn loopback_url_address(url: &str) -> anyhow::Result<SocketAddr> {
    url.strip_prefix("http://")
        .and_then(|rest| rest.parse::<SocketAddr>().ok())
        .filter(|address| address.ip().is_loopback())
        .with_context(|| format!("{url:?} in the lab's settings is not http://127.0.0.1:PORT"))
}

/// What the metadata service answers the machine of `instance`.
async fn metadata(
    clients: &Clients,
    instance: &LabInstance,
    spec: &MachineSpec,
    region: &str,
) -> anyhow::Result<MachineMetadata> {
    let user_data = rigger_aws::lab::user_data(clients, &instance.id).await?;
    let public_key = match &instance.key_name {
        Some(name) => rigger_aws::lab::public_key(clients, name).await?,
        None => None,
    };
    let mut profile = instance.instance_profile_arn.as_ref().map(|arn| Profile {
        arn: arn.clone(),
        id: instance.instance_profile_id.clone().unwrap_or_default(),
    });
    // The emulator launches a group's instances without the profile its launch template
    // names; AWS launches them with it.
    if let (None, Some(group)) = (&profile, &instance.autoscaling_group) {
        let found = match rigger_aws::lab::group_instance_profile(clients, group).await {
            Ok(Some(named)) => rigger_aws::lab::instance_profile(clients, &named).await,
            other => other.map(|_| None),
        };
        match found {
            Ok(Some((arn, id))) => profile = Some(Profile { arn, id }),
            Ok(None) => {}
            Err(error) => tracing::warn!(id = %instance.id, %error, "the group's instance profile"),
        }
    }
    let credentials = match &profile {
        Some(profile) => match credentials(clients, &profile.arn, &instance.id).await {
            Ok(issued) => issued,
            Err(error) => {
                // The machine still boots; the runner tries again at its next round.
                tracing::warn!(id = %instance.id, %error, "credentials of the instance profile");
                None
            }
        },
        None => None,
    };
    let suffix = if region == "us-east-1" {
        "ec2.internal".to_owned()
    } else {
        format!("{region}.compute.internal")
    };
    Ok(MachineMetadata {
        instance_id: instance.id.clone(),
        address: spec.address,
        ami_id: instance.image_id.clone().unwrap_or_default(),
        instance_type: instance.instance_type.clone().unwrap_or_default(),
        availability_zone: instance.availability_zone.clone().unwrap_or_default(),
        region: region.to_owned(),
        local_hostname: instance
            .private_dns_name
            .clone()
            .unwrap_or_else(|| format!("{}.{suffix}", spec.hostname)),
        mac: spec.mac.clone(),
        key_name: instance.key_name.clone(),
        public_key,
        user_data,
        profile,
        credentials,
    })
}

async fn credentials(
    clients: &Clients,
    profile_arn: &str,
    instance_id: &str,
) -> Result<Option<IssuedCredentials>, rigger_aws::AwsError> {
    let issued =
        rigger_aws::lab::role_credentials(clients, profile_arn, instance_id, CREDENTIALS_SECONDS)
            .await?;
    Ok(issued.map(|credentials| IssuedCredentials {
        credentials,
        issued_at: unix_now(),
    }))
}

/// The engine's clock, as the signed seconds AWS's timestamps are.
fn unix_now() -> i64 {
    i64::try_from(rigger_engine::clock::unix_now()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(state: &str, ami: &str, address: &str) -> LabInstance {
        LabInstance {
            id: "i-0123456789abcdef0".to_owned(),
            state: state.to_owned(),
            private_address: Some(address.to_owned()),
            subnet_id: Some("subnet-1".to_owned()),
            private_dns_name: None,
            image_id: Some(ami.to_owned()),
            instance_type: Some("t3.micro".to_owned()),
            availability_zone: Some("us-east-1a".to_owned()),
            key_name: None,
            instance_profile_arn: None,
            instance_profile_id: None,
            autoscaling_group: None,
        }
    }

    fn settings() -> Settings {
        Settings {
            endpoint: "http://127.0.0.1:1".to_owned(),
            emulator: "http://127.0.0.1:2".to_owned(),
            region: "us-east-1".to_owned(),
            ami: "ami-0123456789abcdef0".to_owned(),
            image_hash: "0".repeat(64),
            image_rootfs: "/var/tmp/rigger-lab/images/x/rootfs".to_owned(),
            stock_ami: String::new(),
            stock_image_rootfs: String::new(),
        }
    }

    #[test]
    fn instance_states_decide() {
        assert_eq!(want("pending"), Want::Run);
        assert_eq!(want("running"), Want::Run);
        assert_eq!(want("stopping"), Want::Stop);
        assert_eq!(want("stopped"), Want::Stop);
        assert_eq!(want("shutting-down"), Want::Remove);
        assert_eq!(want("terminated"), Want::Remove);
    }

    #[test]
    fn only_addresses_of_the_lab_network_run() {
        let vpc: Cidr = "172.31.0.0/16".parse().unwrap();
        let s = settings();
        assert_eq!(
            refusal(&instance("running", &s.ami, "172.31.0.4"), vpc),
            Ok(Ipv4Addr::new(172, 31, 0, 4))
        );
        let outside = refusal(&instance("running", &s.ami, "10.0.0.4"), vpc);
        assert!(outside.unwrap_err().contains("outside"));
        let router = refusal(&instance("running", &s.ami, "172.31.0.1"), vpc);
        assert!(router.unwrap_err().contains("router"));
        let mut none = instance("running", &s.ami, "172.31.0.4");
        none.private_address = None;
        assert!(refusal(&none, vpc).unwrap_err().contains("no private"));
        let mut classic = instance("running", &s.ami, "10.86.254.0");
        classic.subnet_id = None;
        assert!(
            refusal(&classic, vpc)
                .unwrap_err()
                .contains("without a subnet")
        );
    }
}
