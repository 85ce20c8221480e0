//! The lab's load balancers: every load balancer of the emulator (classic, and application
//! with its target groups) is HAProxy on this machine, with its listeners, its health checks
//! and its registered instances as backends, and what rigger reads back about their health is
//! HAProxy's own view.
//!
//! - One HAProxy (master-worker, a cgroup of the lab's, a pid record) serves every load
//!   balancer: one process to start, reload and stop, and one stats socket the front's edge
//!   reads; a reload (SIGUSR2 to the master) keeps the listening sockets and lets the old
//!   worker finish its connections, so a change to one load balancer drops nobody's.
//! - Each load balancer listens on this machine's loopback at
//!   [`Lab::loopback_address`]`(10 + n)` (the lowest free one when it appears, kept while it
//!   exists), on each of its listeners' ports. Backends are the registered instances at their
//!   private addresses, reached in the lab's namespace (HAProxy's `namespace` keyword):
//!   nothing of the lab is routed from this machine.
//! - HAProxy backends are "pools": a classic load balancer's instances on one instance port
//!   (the pool of the health check's port checks, the others track it), or a target group
//!   (its own check, `traffic-port` or a port, its matcher's codes).
//! - HTTPS listeners terminate TLS with a certificate of the lab's CA for the load balancer's
//!   name and address: the emulator never gives back an uploaded certificate's private key
//!   (IAM's GetServerCertificate has the body only; ACM exports only private CAs'). Connections
//!   to instances are TLS again when the instance protocol is HTTPS (not verified, as ELB does
//!   not verify instances' certificates).
//! - An instance starts out of service and needs the healthy threshold of passing checks, as
//!   on ELB: a server HAProxy has not seen before is set down through its runtime API after
//!   each (re)load (once the new worker answers on the socket: the old one would take the
//!   command and drop it), and the state of the others is carried across reloads. HAProxy 2.6
//!   cannot start a server down, so in the moment before that command a new worker may pick a
//!   server that never passed a check: the connection it fails is redispatched to another
//!   server (`option redispatch`) rather than answered 503, as ELB would never have tried it.
//! - A target deregistered from a target group drains as on ALB: it stays in HAProxy in the
//!   `drain` state (no new requests) until its connections end or the group's deregistration
//!   delay passes.
//! - [`BalancerEdge`] is an [`Edge`] of the front: `DescribeInstanceHealth` and
//!   `DescribeTargetHealth` are answered from HAProxy's `show stat`, and `DescribeLoadBalancers`
//!   (both APIs) names each load balancer by its loopback address instead of its DNS name
//!   (which resolves nowhere), so the URL rigger prints works from this machine.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rigger_aws::lab::{LabApplicationLoadBalancer, LabLoadBalancer, LabTargetGroup};
use rigger_local::process::{self, ProcessSpec, Supervised};

use crate::front::{Edge, EmulatorCall};
use crate::layout::Lab;
use crate::sys;

/// The first host number of the load balancers in the lab's loopback block.
pub const FIRST_LOOPBACK_HOST: u8 = 10;

/// The classic API's version (Query protocol), as calls name it.
const CLASSIC_VERSION: &str = "2012-06-01";
/// The application load balancers' API version.
const V2_VERSION: &str = "2015-12-01";

/// Which API a load balancer belongs to (the two have separate name spaces).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Classic,
    Application,
}

impl Kind {
    /// As `rigger lab status` names it.
    pub fn word(self) -> &'static str {
        match self {
            Kind::Classic => "classic",
            Kind::Application => "application",
        }
    }

    /// The prefix of its HAProxy frontends and certificate files.
    fn prefix(self) -> &'static str {
        match self {
            Kind::Classic => "elb",
            Kind::Application => "alb",
        }
    }
}

/// The emulator's load balancers, as the runner read them.
#[derive(Debug, Clone, Default)]
pub struct Emulated {
    pub classic: Vec<LabLoadBalancer>,
    pub application: Vec<LabApplicationLoadBalancer>,
    pub target_groups: Vec<LabTargetGroup>,
}

/// A load balancer as HAProxy serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Served {
    kind: Kind,
    name: String,
    dns_name: String,
    address: Ipv4Addr,
    /// (port, protocol, the pool it forwards to: none for an application listener that
    /// forwards nowhere, which answers 503).
    listeners: Vec<(i32, String, Option<String>)>,
    /// A classic load balancer's pool whose health DescribeInstanceHealth reports.
    checked_pool: Option<String>,
}

/// Servers behind one health check: an HAProxy backend.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pool {
    /// The HAProxy backend's name.
    name: String,
    /// A target group's (ARN, name); none for a classic load balancer's pool.
    target_group: Option<(String, String)>,
    /// The servers' protocol: `HTTP`, `HTTPS`, `TCP`, `SSL`.
    protocol: String,
    check: Check,
    /// Registered members in registration order, draining ones where they were.
    members: Vec<Member>,
    /// How long a deregistered member drains (none for classic: a reload lets the old
    /// worker finish its connections).
    drain: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Check {
    Own(HealthCheck),
    /// Follows the same server in another pool (a classic load balancer checks an instance
    /// once for all its listeners).
    Track(String),
    /// A target group with health checks disabled.
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct HealthCheck {
    /// `HTTP`, `HTTPS`, `TCP`, `SSL`.
    protocol: String,
    /// None: the server's own port (a target group's `traffic-port`).
    port: Option<i32>,
    path: String,
    interval: i32,
    timeout: i32,
    rise: i32,
    fall: i32,
    /// The codes a passing HTTP check answers (`200`, `200-299`, `200,302`).
    codes: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    id: String,
    port: i32,
    /// None while it has no running machine (not a server in HAProxy then).
    address: Option<Ipv4Addr>,
    draining: bool,
}

impl Member {
    /// Its server's name in its pool.
    fn server(&self) -> String {
        format!("{}-{}", self.id, self.port)
    }
}

/// Everything HAProxy serves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Layout {
    balancers: Vec<Served>,
    pools: Vec<Pool>,
}

impl Layout {
    fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// The pool that checks `pool`'s servers (itself, or the one it tracks).
    fn checking<'a>(&'a self, pool: &'a Pool) -> &'a Pool {
        match &pool.check {
            Check::Track(other) => self.pool(other).unwrap_or(pool),
            _ => pool,
        }
    }
}

/// A deregistered target draining in HAProxy.
#[derive(Debug, Clone)]
struct Draining {
    member: Member,
    until: Instant,
}

/// The lab's HAProxy and what it serves.
pub struct Balancers {
    dir: PathBuf,
    namespace: String,
    lab: Lab,
    process: Mutex<Option<Supervised>>,
    /// What HAProxy serves (its configuration was rendered from this).
    layout: Mutex<Layout>,
    /// The configuration HAProxy runs.
    config: Mutex<Option<String>>,
    /// Servers (`pool/server`) HAProxy knows, so that only new ones are set down.
    known: Mutex<BTreeSet<String>>,
    /// Servers that were in service since they joined (an instance that fails later is
    /// "failing", one that never passed is "initial").
    ever_up: Mutex<BTreeSet<String>>,
    /// Deregistered targets draining, by `pool/server`.
    draining: Mutex<BTreeMap<String, Draining>>,
    /// Each load balancer's host number in the lab's loopback block, kept while it exists so
    /// that another's creation or deletion never moves it.
    hosts: Mutex<BTreeMap<(Kind, String), u8>>,
}

/// An instance's health behind a lab load balancer, from HAProxy's view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Up in HAProxy, and checked.
    InService,
    /// Not passed its healthy threshold since it was registered; whether HAProxy checked it
    /// at all.
    Initial { checked: bool },
    /// Its checks fail: HAProxy's last check status (`L4CON`, `L7STS`, ...) and HTTP code.
    Failing { check: String, code: Option<u16> },
    /// Registered, but no running machine has its address.
    NoMachine,
    /// Deregistered, finishing its connections.
    Draining,
    /// Its target group checks no health.
    Unchecked,
}

/// One server as HAProxy's `show stat` has it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ServerView {
    /// UP (also while going down, `UP 1/3`, as ELB keeps an instance in service until the
    /// unhealthy threshold of failed checks), or draining while up.
    up: bool,
    /// The last check's status without the "in progress" mark (`L7OK`, `L4CON`, `INI`, empty
    /// for a server without a check of its own).
    last_check: String,
    code: Option<u16>,
    /// Current sessions.
    sessions: u64,
}

impl Balancers {
    pub fn new(lab: &Lab) -> Balancers {
        Balancers {
            dir: lab.state.join("haproxy"),
            namespace: lab.namespace(),
            lab: lab.clone(),
            process: Mutex::new(None),
            layout: Mutex::new(Layout::default()),
            config: Mutex::new(None),
            known: Mutex::new(BTreeSet::new()),
            ever_up: Mutex::new(BTreeSet::new()),
            draining: Mutex::new(BTreeMap::new()),
            hosts: Mutex::new(BTreeMap::new()),
        }
    }

    /// Host numbers for `keys`: the ones they had, the lowest free for new ones; keys gone
    /// release theirs. A load balancer with no host left is not served.
    fn assign_hosts(&self, keys: &[(Kind, String)]) -> BTreeMap<(Kind, String), u8> {
        let mut hosts = self.hosts.lock().expect("lock");
        hosts.retain(|key, _| keys.contains(key));
        for key in keys {
            if hosts.contains_key(key) {
                continue;
            }
            let taken: BTreeSet<u8> = hosts.values().copied().collect();
            match (FIRST_LOOPBACK_HOST..=254).find(|host| !taken.contains(host)) {
                Some(host) => {
                    hosts.insert(key.clone(), host);
                }
                None => {
                    tracing::warn!(name = %key.1, "no loopback address left for this load balancer")
                }
            }
        }
        hosts.clone()
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("stats.sock")
    }

    /// Makes HAProxy serve `emulated` (addresses of the instances from `addresses`),
    /// starting, reloading or stopping it when its configuration changes.
    pub async fn converge(
        &self,
        emulated: Emulated,
        addresses: &HashMap<String, Ipv4Addr>,
        pki: &crate::pki::Pki,
    ) -> anyhow::Result<()> {
        let mut keys: Vec<(Kind, String)> = emulated
            .classic
            .iter()
            .map(|lb| (Kind::Classic, lb.name.clone()))
            .chain(
                emulated
                    .application
                    .iter()
                    .map(|lb| (Kind::Application, lb.name.clone())),
            )
            .collect();
        keys.sort();
        let hosts = self.assign_hosts(&keys);
        let address_of = |kind: Kind, name: &str| {
            hosts
                .get(&(kind, name.to_owned()))
                .map(|host| self.lab.loopback_address(*host))
        };
        let mut wanted = plan(&emulated, address_of, addresses);
        let views = self.views();
        self.drain(&mut wanted, &views);
        let config = render(&wanted, &self.dir, &self.namespace);
        let unchanged = self.config.lock().expect("lock").as_deref() == Some(config.as_str());
        if unchanged {
            self.apply_drains(&wanted);
            *self.layout.lock().expect("lock") = wanted;
            return Ok(());
        }
        if wanted.balancers.is_empty() {
            self.stop().await;
            self.forget_certificates(&wanted)?;
            return Ok(());
        }
        sys::create_trusted_dir(&self.dir, 0o700)?;
        for served in &wanted.balancers {
            self.certify(served, pki)?;
        }
        self.forget_certificates(&wanted)?;
        // Carry the servers' health across the reload (a reload must not put a failing server
        // back in service).
        if let Ok(state) = self.command("show servers state") {
            write_private(&self.dir.join("server-state"), &state)?;
        }
        write_private(&self.dir.join("haproxy.cfg"), &config)?;
        let worker_before = self.worker_pid();
        let started = {
            let mut process = self.process.lock().expect("lock");
            let alive = process
                .as_mut()
                .is_some_and(|p| matches!(p.try_wait(), Ok(None)));
            match process.as_ref() {
                Some(running) if alive => {
                    nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(running.pid()),
                        nix::sys::signal::Signal::SIGUSR2,
                    )
                    .context("reloading HAProxy")?;
                    false
                }
                _ => {
                    drop(process.take());
                    true
                }
            }
        };
        if started {
            let spawned = self.start().await?;
            *self.process.lock().expect("lock") = Some(spawned);
        } else {
            // Runtime commands (a new server's initial state, a drain) must reach the new
            // worker: until it has taken the socket, the old one answers them, and the new
            // one would start with a server that never passed a check in service.
            for attempt in 0..200 {
                let now = self.worker_pid();
                if now.is_some() && now != worker_before {
                    break;
                }
                if attempt == 199 {
                    tracing::warn!("HAProxy's new worker did not answer on its socket");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // New servers with a check of their own start out of service, as on ELB (the ones
        // tracking them follow): set down once the (new) worker answers.
        let servers: BTreeSet<String> = wanted
            .pools
            .iter()
            .filter(|pool| matches!(pool.check, Check::Own(_)))
            .flat_map(|pool| {
                pool.members
                    .iter()
                    .filter(|m| m.address.is_some())
                    .map(move |m| format!("{}/{}", pool.name, m.server()))
            })
            .collect();
        let fresh: Vec<String> = {
            let known = self.known.lock().expect("lock");
            servers.difference(&known).cloned().collect()
        };
        for attempt in 0..100 {
            let answered = fresh.iter().all(|server| {
                self.command(&format!("set server {server} health down"))
                    .is_ok_and(|said| said.trim().is_empty())
            });
            if answered {
                break;
            }
            if attempt == 99 {
                tracing::warn!("HAProxy did not take the new servers' initial state");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.ever_up
            .lock()
            .expect("lock")
            .retain(|server| servers.contains(server));
        *self.known.lock().expect("lock") = servers;
        self.apply_drains(&wanted);
        *self.config.lock().expect("lock") = Some(config);
        *self.layout.lock().expect("lock") = wanted;
        Ok(())
    }

    /// Keeps the members deregistered from a target group since the last round in `wanted`
    /// as draining, until their connections end or their pool's delay passes.
    fn drain(&self, wanted: &mut Layout, views: &BTreeMap<String, ServerView>) {
        let before = self.layout.lock().expect("lock").clone();
        let mut draining = self.draining.lock().expect("lock");
        let now = Instant::now();
        for pool in &mut wanted.pools {
            let Some(old) = before.pool(&pool.name) else {
                continue;
            };
            if pool.drain.is_zero() {
                continue;
            }
            for member in &old.members {
                let gone = !pool.members.iter().any(|m| m.server() == member.server());
                let key = format!("{}/{}", pool.name, member.server());
                if gone && member.address.is_some() && !draining.contains_key(&key) {
                    draining.insert(
                        key,
                        Draining {
                            member: Member {
                                draining: true,
                                ..member.clone()
                            },
                            until: now + pool.drain,
                        },
                    );
                }
            }
        }
        draining.retain(|key, entry| {
            let (pool_name, server) = key.split_once('/').unwrap_or_default();
            let Some(pool) = wanted.pools.iter().find(|p| p.name == pool_name) else {
                return false;
            };
            let registered = pool.members.iter().any(|m| m.server() == server);
            let sessions = views.get(key).map_or(0, |v| v.sessions);
            !registered && sessions > 0 && now < entry.until
        });
        for (key, entry) in draining.iter() {
            let pool_name = key.split_once('/').map_or("", |(pool, _)| pool);
            let Some(pool) = wanted.pools.iter_mut().find(|p| p.name == pool_name) else {
                continue;
            };
            // It keeps its place: moving it would change the configuration, and the reload
            // that follows is not instantaneous (its new worker may answer 503 for a moment
            // while the other servers' state is carried over), where ALB disturbs nobody.
            let ahead_of_it: BTreeSet<String> = before
                .pool(pool_name)
                .map(|old| {
                    old.members
                        .iter()
                        .map(Member::server)
                        .take_while(|server| *server != entry.member.server())
                        .collect()
                })
                .unwrap_or_default();
            let place = pool
                .members
                .iter()
                .rposition(|m| ahead_of_it.contains(&m.server()))
                .map_or(0, |i| i + 1);
            pool.members.insert(place, entry.member.clone());
        }
    }

    /// Puts the draining members in HAProxy's `drain` state (no new connections).
    fn apply_drains(&self, layout: &Layout) {
        for pool in &layout.pools {
            for member in pool.members.iter().filter(|m| m.draining) {
                let server = format!("{}/{}", pool.name, member.server());
                if let Err(error) = self.command(&format!("set server {server} state drain")) {
                    tracing::warn!(%server, %error, "draining a deregistered target");
                }
            }
        }
    }

    /// Issues the lab CA's certificate for `served` (its DNS name and loopback address) unless
    /// the one it has is for the same names.
    fn certify(&self, served: &Served, pki: &crate::pki::Pki) -> anyhow::Result<()> {
        let pem = self.certificate_path(served.kind, &served.name);
        let mut names = vec![format!("IP:{}", served.address)];
        if !served.dns_name.is_empty() {
            names.insert(0, format!("DNS:{}", served.dns_name));
        }
        let for_names = pem.with_extension("names");
        if pem.exists() && std::fs::read_to_string(&for_names).ok() == Some(names.join(",")) {
            return Ok(());
        }
        let (certificate, key) = (pem.with_extension("crt"), pem.with_extension("key"));
        pki.issue(&certificate, &key, &served.name, &names)?;
        let text = std::fs::read_to_string(&certificate)? + &std::fs::read_to_string(&key)?;
        write_private(&pem, &text)?;
        std::fs::remove_file(&key).with_context(|| format!("removing {}", key.display()))?;
        write_private(&for_names, &names.join(","))
    }

    fn certificate_path(&self, kind: Kind, name: &str) -> PathBuf {
        self.dir.join(format!("{}-{name}.pem", kind.prefix()))
    }

    /// Removes the certificates (and keys) of load balancers no longer served.
    fn forget_certificates(&self, layout: &Layout) -> anyhow::Result<()> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(());
        };
        let kept: BTreeSet<PathBuf> = layout
            .balancers
            .iter()
            .map(|s| self.certificate_path(s.kind, &s.name))
            .collect();
        for entry in entries.flatten() {
            let path = entry.path();
            let is_certificate = matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("pem" | "crt" | "key" | "names")
            );
            if is_certificate && !kept.contains(&path.with_extension("pem")) {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
        Ok(())
    }

    async fn start(&self) -> anyhow::Result<Supervised> {
        let groups: Vec<PathBuf> = sys::cgroup_roots()
            .into_iter()
            .map(|root| root.join(self.lab.cgroup()).join("haproxy"))
            .collect();
        for group in &groups {
            std::fs::create_dir_all(group)
                .with_context(|| format!("creating cgroup {}", group.display()))?;
        }
        let mut args = sys::enter_cgroups_args(&groups);
        args.extend([
            "haproxy".to_owned(),
            "-W".to_owned(),
            "-db".to_owned(),
            "-f".to_owned(),
            self.dir.join("haproxy.cfg").display().to_string(),
        ]);
        let spec = ProcessSpec {
            name: "load balancers".to_owned(),
            program: PathBuf::from("/bin/sh"),
            args,
            env: [("PATH".to_owned(), process::DEFAULT_PATH.to_owned())]
                .into_iter()
                .collect(),
            cwd: Some(self.dir.clone()),
            user: None,
            log_path: self.lab.state.join("haproxy.log"),
            pid_path: self.lab.pids_dir().join("haproxy.pid"),
            stop_signal: nix::sys::signal::Signal::SIGTERM,
            stop_timeout: Duration::from_secs(5),
        };
        process::spawn(&spec).await.context("starting HAProxy")
    }

    /// Stops HAProxy and forgets what it served.
    pub async fn stop(&self) {
        let taken = self.process.lock().expect("lock").take();
        if let Some(mut running) = taken {
            process::stop_supervised(
                &mut running,
                nix::sys::signal::Signal::SIGTERM,
                Duration::from_secs(5),
            )
            .await;
        }
        self.known.lock().expect("lock").clear();
        self.ever_up.lock().expect("lock").clear();
        self.draining.lock().expect("lock").clear();
        *self.config.lock().expect("lock") = None;
        *self.layout.lock().expect("lock") = Layout::default();
    }

    /// One command on HAProxy's runtime API; its answer.
    /// The pid of the HAProxy worker answering on the stats socket.
    fn worker_pid(&self) -> Option<u32> {
        let info = self.command("show info").ok()?;
        info.lines()
            .find_map(|line| line.strip_prefix("Pid: "))
            .and_then(|pid| pid.trim().parse().ok())
    }

    fn command(&self, line: &str) -> std::io::Result<String> {
        let mut stream = UnixStream::connect(self.socket())?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(format!("{line}\n").as_bytes())?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    }

    /// Every server's view in HAProxy's stats now (empty when HAProxy does not answer);
    /// remembers which were ever in service.
    fn views(&self) -> BTreeMap<String, ServerView> {
        if self.config.lock().expect("lock").is_none() {
            return BTreeMap::new();
        }
        let views = parse_stats(&self.command("show stat").unwrap_or_default());
        let mut ever_up = self.ever_up.lock().expect("lock");
        for (server, view) in &views {
            if view.up && is_checked(&view.last_check) {
                ever_up.insert(server.clone());
            }
        }
        views
    }

    /// Each member's health in `pool` (of `layout`), given HAProxy's `views`.
    fn pool_health(
        &self,
        layout: &Layout,
        pool: &Pool,
        views: &BTreeMap<String, ServerView>,
    ) -> Vec<(Member, Health)> {
        let checking = layout.checking(pool);
        let ever_up = self.ever_up.lock().expect("lock");
        pool.members
            .iter()
            .map(|member| {
                let checked_member = checking
                    .members
                    .iter()
                    .find(|m| m.id == member.id)
                    .unwrap_or(member);
                let key = format!("{}/{}", checking.name, checked_member.server());
                let health = health_of(
                    member,
                    &checking.check,
                    views.get(&key),
                    ever_up.contains(&key),
                );
                (member.clone(), health)
            })
            .collect()
    }

    /// Each registered instance's health behind classic load balancer `name`, in
    /// registration order; none when it is not served.
    fn classic_health(&self, name: &str) -> Option<Vec<(String, Health)>> {
        let layout = self.layout.lock().expect("lock").clone();
        let served = layout
            .balancers
            .iter()
            .find(|s| s.kind == Kind::Classic && s.name == name)?;
        let pool = layout.pool(served.checked_pool.as_deref()?)?;
        let views = self.views();
        Some(
            self.pool_health(&layout, pool, &views)
                .into_iter()
                .map(|(member, health)| (member.id, health))
                .collect(),
        )
    }

    /// Every member's health in target group `arn`, when a served load balancer forwards
    /// to it.
    fn target_group_health(&self, arn: &str) -> Option<Vec<(Member, Health)>> {
        let layout = self.layout.lock().expect("lock").clone();
        let pool = layout
            .pools
            .iter()
            .find(|p| p.target_group.as_ref().is_some_and(|(a, _)| a == arn))?;
        let views = self.views();
        Some(self.pool_health(&layout, pool, &views))
    }

    /// Every load balancer served, with its backends' health, for the lab's status.
    pub fn status(&self) -> Vec<crate::status::BalancerStatus> {
        let layout = self.layout.lock().expect("lock").clone();
        if layout.balancers.is_empty() {
            return Vec::new();
        }
        let views = self.views();
        layout
            .balancers
            .iter()
            .map(|served| {
                let pools: Vec<&str> = match &served.checked_pool {
                    Some(pool) => vec![pool.as_str()],
                    None => {
                        let mut pools: Vec<&str> = Vec::new();
                        for pool in served.listeners.iter().filter_map(|l| l.2.as_deref()) {
                            if !pools.contains(&pool) {
                                pools.push(pool);
                            }
                        }
                        pools
                    }
                };
                let backends = pools
                    .iter()
                    .filter_map(|name| layout.pool(name))
                    .flat_map(|pool| {
                        self.pool_health(&layout, pool, &views).into_iter().map(
                            |(member, health)| crate::status::BackendStatus {
                                instance_id: member.id,
                                address: member.address.map(|a| a.to_string()),
                                state: match health {
                                    Health::InService | Health::Unchecked => "in_service",
                                    Health::Draining => "draining",
                                    _ => "out_of_service",
                                }
                                .to_owned(),
                                target_group: pool.target_group.as_ref().map(|g| g.1.clone()),
                            },
                        )
                    })
                    .collect();
                crate::status::BalancerStatus {
                    name: served.name.clone(),
                    kind: served.kind.word().to_owned(),
                    address: served.address.to_string(),
                    url: url(served),
                    backends,
                }
            })
            .collect()
    }
}

/// Whether a check status says a check ran.
fn is_checked(last_check: &str) -> bool {
    !last_check.is_empty() && last_check != "INI"
}

/// A member's health from the view of the server that checks it.
fn health_of(member: &Member, check: &Check, view: Option<&ServerView>, ever_up: bool) -> Health {
    if member.draining {
        return Health::Draining;
    }
    if member.address.is_none() {
        return Health::NoMachine;
    }
    if *check == Check::Off {
        return Health::Unchecked;
    }
    let Some(view) = view else {
        return Health::Initial { checked: false };
    };
    let passed = matches!(view.last_check.as_str(), "L4OK" | "L6OK" | "L7OK");
    if view.up && is_checked(&view.last_check) {
        Health::InService
    } else if !is_checked(&view.last_check) {
        Health::Initial { checked: false }
    } else if passed && !ever_up {
        Health::Initial { checked: true }
    } else {
        Health::Failing {
            check: view.last_check.clone(),
            code: view.code,
        }
    }
}

/// `https://ADDRESS/` for a load balancer with an HTTPS listener on 443, as rigger's
/// status prints it, else `http://ADDRESS/`.
fn url(served: &Served) -> String {
    let https = served
        .listeners
        .iter()
        .any(|l| l.0 == 443 && l.1.eq_ignore_ascii_case("HTTPS"));
    format!(
        "{}://{}/",
        if https { "https" } else { "http" },
        served.address
    )
}

/// What HAProxy should serve for `emulated`: the load balancers that have an address
/// (`address_of`) and plain names, their pools with the instances' `addresses`.
fn plan(
    emulated: &Emulated,
    address_of: impl Fn(Kind, &str) -> Option<Ipv4Addr>,
    addresses: &HashMap<String, Ipv4Addr>,
) -> Layout {
    let mut layout = Layout::default();
    for lb in &emulated.classic {
        let Some(address) = address_of(Kind::Classic, &lb.name) else {
            continue;
        };
        if !is_plain(&lb.name) {
            tracing::warn!(name = %lb.name, "a load balancer name HAProxy cannot take: not served");
            continue;
        }
        let (check_protocol, check_port, check_path) = parse_target(&lb.health_target);
        let checked_port = lb
            .listeners
            .iter()
            .map(|l| l.2)
            .find(|p| *p == check_port)
            .or_else(|| lb.listeners.first().map(|l| l.2));
        let pool_name = |port: i32| format!("elb-{}-{port}", lb.name);
        let mut served = Served {
            kind: Kind::Classic,
            name: lb.name.clone(),
            dns_name: lb.dns_name.clone(),
            address,
            listeners: Vec::new(),
            checked_pool: checked_port.map(pool_name),
        };
        for (lb_port, lb_protocol, instance_port, instance_protocol) in &lb.listeners {
            served.listeners.push((
                *lb_port,
                lb_protocol.clone(),
                Some(pool_name(*instance_port)),
            ));
            if layout.pool(&pool_name(*instance_port)).is_some() {
                continue;
            }
            let check = if Some(*instance_port) == checked_port {
                Check::Own(HealthCheck {
                    protocol: check_protocol.clone(),
                    port: Some(check_port),
                    path: check_path.clone(),
                    interval: lb.interval_seconds,
                    timeout: lb.timeout_seconds,
                    rise: lb.healthy_threshold,
                    fall: lb.unhealthy_threshold,
                    codes: "200".to_owned(),
                })
            } else {
                Check::Track(pool_name(checked_port.unwrap_or(*instance_port)))
            };
            layout.pools.push(Pool {
                name: pool_name(*instance_port),
                target_group: None,
                protocol: instance_protocol.to_ascii_uppercase(),
                check,
                members: lb
                    .instances
                    .iter()
                    .map(|id| Member {
                        id: id.clone(),
                        port: *instance_port,
                        address: addresses.get(id).copied(),
                        draining: false,
                    })
                    .collect(),
                drain: Duration::ZERO,
            });
        }
        layout.balancers.push(served);
    }
    for lb in &emulated.application {
        let Some(address) = address_of(Kind::Application, &lb.name) else {
            continue;
        };
        if !is_plain(&lb.name) {
            tracing::warn!(name = %lb.name, "a load balancer name HAProxy cannot take: not served");
            continue;
        }
        let mut served = Served {
            kind: Kind::Application,
            name: lb.name.clone(),
            dns_name: lb.dns_name.clone(),
            address,
            listeners: Vec::new(),
            checked_pool: None,
        };
        for (port, protocol, forward) in &lb.listeners {
            let group = forward
                .as_ref()
                .and_then(|arn| emulated.target_groups.iter().find(|g| &g.arn == arn))
                .filter(|g| is_plain(&g.name));
            let pool = group.map(|g| format!("tg-{}", g.name));
            if let (Some(group), Some(name)) = (group, &pool)
                && layout.pool(name).is_none()
            {
                layout.pools.push(target_group_pool(group, name, addresses));
            }
            served.listeners.push((*port, protocol.clone(), pool));
        }
        layout.balancers.push(served);
    }
    layout
}

/// Target group `group` as pool `name`.
fn target_group_pool(
    group: &LabTargetGroup,
    name: &str,
    addresses: &HashMap<String, Ipv4Addr>,
) -> Pool {
    let codes_plain = !group.matcher.is_empty()
        && group
            .matcher
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b',' || b == b'-');
    let check = if group.health_enabled {
        Check::Own(HealthCheck {
            protocol: group.health_protocol.to_ascii_uppercase(),
            port: group.health_port,
            path: group.health_path.clone(),
            interval: group.interval_seconds,
            timeout: group.timeout_seconds,
            rise: group.healthy_threshold,
            fall: group.unhealthy_threshold,
            codes: if codes_plain {
                group.matcher.clone()
            } else {
                "200".to_owned()
            },
        })
    } else {
        Check::Off
    };
    Pool {
        name: name.to_owned(),
        target_group: Some((group.arn.clone(), group.name.clone())),
        protocol: group.protocol.to_ascii_uppercase(),
        check,
        members: group
            .targets
            .iter()
            .map(|(id, port)| Member {
                id: id.clone(),
                port: *port,
                address: addresses.get(id).copied(),
                draining: false,
            })
            .collect(),
        drain: Duration::from_secs(group.deregistration_delay_seconds.max(0) as u64),
    }
}

/// `HTTPS:443/healthcheck.html` -> ("HTTPS", 443, "/healthcheck.html").
fn parse_target(target: &str) -> (String, i32, String) {
    let (protocol, rest) = target.split_once(':').unwrap_or(("TCP", target));
    let (port, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, ""),
    };
    (
        protocol.to_ascii_uppercase(),
        port.parse().unwrap_or(80),
        path.to_owned(),
    )
}

/// Whether `text` may go into HAProxy's configuration as one word.
fn is_plain(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:".contains(&b))
}

fn is_tls(protocol: &str) -> bool {
    protocol.eq_ignore_ascii_case("HTTPS") || protocol.eq_ignore_ascii_case("SSL")
}

/// HAProxy's configuration for `layout`.
fn render(layout: &Layout, dir: &Path, namespace: &str) -> String {
    let d = dir.display();
    let mut out = format!(
        "# The rigger lab's load balancers (crates/rigger-lab/src/balancer.rs): made by the lab.\n\
         global\n  stats socket {d}/stats.sock mode 600 level admin expose-fd listeners\n  \
         log stderr format raw local0 info\n  \
         server-state-file {d}/server-state\n  maxconn 4096\n\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  \
         timeout server 60s\n  load-server-state-from-file global\n  log global\n  retries 3\n  \
         option redispatch\n"
    );
    for served in &layout.balancers {
        for (port, protocol, pool) in &served.listeners {
            let ssl = if is_tls(protocol) {
                format!(" ssl crt {d}/{}-{}.pem", served.kind.prefix(), served.name)
            } else {
                String::new()
            };
            let http = !matches!(protocol.to_ascii_uppercase().as_str(), "TCP" | "SSL");
            let _ = write!(
                out,
                "\nfrontend {}-{}:{port}\n  mode {}\n  bind {}:{port}{ssl}\n",
                served.kind.prefix(),
                served.name,
                if http { "http" } else { "tcp" },
                served.address
            );
            if http {
                let proto = if ssl.is_empty() { "http" } else { "https" };
                // Each request logged (haproxy.log in the lab's state): where an answer
                // came from, and why when HAProxy made it (`NOSRV`, `SC--`).
                let _ = writeln!(out, "  option httplog");
                let _ = writeln!(out, "  option forwardfor");
                let _ = writeln!(out, "  http-request set-header X-Forwarded-Proto {proto}");
                let _ = writeln!(out, "  http-request set-header X-Forwarded-Port {port}");
            }
            if let Some(pool) = pool {
                let _ = writeln!(out, "  default_backend {pool}");
            }
        }
    }
    for pool in &layout.pools {
        let http = matches!(pool.protocol.as_str(), "HTTP" | "HTTPS");
        let _ = write!(
            out,
            "\nbackend {}\n  mode {}\n",
            pool.name,
            if http { "http" } else { "tcp" }
        );
        if let Check::Own(check) = &pool.check {
            if matches!(check.protocol.as_str(), "HTTP" | "HTTPS") && is_plain(&check.path) {
                let _ = writeln!(out, "  option httpchk GET {}", check.path);
                let _ = writeln!(out, "  http-check expect status {}", check.codes);
            }
            let _ = writeln!(
                out,
                "  timeout check {}s\n  default-server inter {}s rise {} fall {}",
                check.timeout.max(1),
                check.interval.max(1),
                check.rise.max(1),
                check.fall.max(1)
            );
        }
        let server_tls = is_tls(&pool.protocol);
        for member in &pool.members {
            let Some(address) = member.address else {
                continue;
            };
            let mut line = format!(
                "  server {} {address}:{} namespace {namespace}",
                member.server(),
                member.port
            );
            if server_tls {
                line.push_str(" ssl verify none");
            }
            match &pool.check {
                Check::Own(check) => {
                    line.push_str(" check");
                    if let Some(port) = check.port.filter(|p| *p != member.port) {
                        let _ = write!(line, " port {port}");
                    }
                    match (is_tls(&check.protocol), server_tls) {
                        (true, false) => line.push_str(" check-ssl verify none"),
                        (false, true) => line.push_str(" no-check-ssl"),
                        _ => {}
                    }
                }
                Check::Track(tracked) => {
                    // The tracked pool's server for the same instance.
                    let server = layout
                        .pool(tracked)
                        .and_then(|p| p.members.iter().find(|m| m.id == member.id))
                        .map_or_else(|| member.server(), Member::server);
                    let _ = write!(line, " track {tracked}/{server}");
                }
                Check::Off => {}
            }
            let _ = writeln!(out, "{line}");
        }
    }
    out
}

/// Every server's (`pool/server`) view in HAProxy's `show stat`.
fn parse_stats(stats: &str) -> BTreeMap<String, ServerView> {
    let mut lines = stats.lines();
    let Some(header) = lines.next() else {
        return BTreeMap::new();
    };
    let columns: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
    let at = |name: &str| columns.iter().position(|c| *c == name);
    let (Some(px), Some(sv), Some(status)) = (at("pxname"), at("svname"), at("status")) else {
        return BTreeMap::new();
    };
    let (check, code, scur) = (at("check_status"), at("check_code"), at("scur"));
    lines
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            let server = fields.get(sv)?;
            if matches!(*server, "FRONTEND" | "BACKEND") {
                return None;
            }
            let backend = fields.get(px)?;
            let status = fields.get(status)?;
            let field = |column: Option<usize>| column.and_then(|c| fields.get(c)).copied();
            Some((
                format!("{backend}/{server}"),
                ServerView {
                    up: status.starts_with("UP") || status.starts_with("DRAIN"),
                    last_check: field(check)
                        .unwrap_or("")
                        .trim_start_matches("* ")
                        .to_owned(),
                    code: field(code).and_then(|c| c.parse().ok()),
                    sessions: field(scur).and_then(|c| c.parse().ok()).unwrap_or(0),
                },
            ))
        })
        .collect()
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text).with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))
}

/// The balancers as an edge of the front: HAProxy's view of instance and target health, and
/// load balancers named by their loopback address.
pub struct BalancerEdge(pub Arc<Balancers>);

impl Edge for BalancerEdge {
    fn rewrite(&self, call: &EmulatorCall, status: u16, body: &[u8]) -> Option<Vec<u8>> {
        if call.service != "elasticloadbalancing" || status != 200 {
            return None;
        }
        let kind = match call.param("Version") {
            Some(CLASSIC_VERSION) => Kind::Classic,
            Some(V2_VERSION) => Kind::Application,
            _ => return None,
        };
        match (kind, call.action.as_str()) {
            (Kind::Classic, "DescribeInstanceHealth") => {
                let name = call.param("LoadBalancerName")?;
                let asked: Vec<&str> = call
                    .params
                    .iter()
                    .filter(|(k, _)| {
                        k.starts_with("Instances.member.") && k.ends_with(".InstanceId")
                    })
                    .map(|(_, v)| v.as_str())
                    .collect();
                match self.0.classic_health(name) {
                    Some(health) => Some(instance_health_xml(&health, &asked).into_bytes()),
                    // Not served yet (created a moment ago): nothing is in service behind it.
                    None => Some(
                        String::from_utf8_lossy(body)
                            .replace("<State>InService</State>", "<State>OutOfService</State>")
                            .into_bytes(),
                    ),
                }
            }
            (Kind::Application, "DescribeTargetHealth") => {
                let arn = call.param("TargetGroupArn")?;
                let asked = call
                    .params
                    .iter()
                    .any(|(k, _)| k.starts_with("Targets.member."));
                let emulator = parse_target_health(&String::from_utf8_lossy(body));
                let health = self.0.target_group_health(arn);
                let answer = target_health(&emulator, health.as_deref(), asked);
                Some(target_health_xml(&answer).into_bytes())
            }
            (_, "DescribeLoadBalancers") => {
                let mut text = String::from_utf8(body.to_vec()).ok()?;
                let layout = self.0.layout.lock().expect("lock").clone();
                for served in layout.balancers.iter().filter(|s| s.kind == kind) {
                    if !served.dns_name.is_empty() {
                        text = text.replace(
                            &format!("<DNSName>{}</DNSName>", served.dns_name),
                            &format!("<DNSName>{}</DNSName>", served.address),
                        );
                    }
                }
                Some(text.into_bytes())
            }
            _ => None,
        }
    }
}

/// DescribeInstanceHealth's answer for `health` (only `asked`, when any were named), in
/// ELB's words.
fn instance_health_xml(health: &[(String, Health)], asked: &[&str]) -> String {
    let mut members = String::new();
    for (id, health) in health {
        if !asked.is_empty() && !asked.contains(&id.as_str()) {
            continue;
        }
        let (state, reason, description) = match health {
            Health::InService | Health::Unchecked => ("InService", "N/A", "N/A"),
            Health::Initial { .. } => (
                "OutOfService",
                "ELB",
                "Instance registration is still in progress.",
            ),
            Health::Failing { .. } => (
                "OutOfService",
                "Instance",
                "Instance has failed at least the UnhealthyThreshold number of health checks consecutively.",
            ),
            Health::NoMachine => ("OutOfService", "Instance", "Instance is in stopped state."),
            Health::Draining => (
                "OutOfService",
                "Instance",
                "Instance deregistration currently in progress.",
            ),
        };
        let _ = write!(
            members,
            "<member><Description>{description}</Description><InstanceId>{}</InstanceId>\
             <State>{state}</State><ReasonCode>{reason}</ReasonCode></member>",
            escape(id)
        );
    }
    format!(
        "<DescribeInstanceHealthResponse xmlns=\"http://elasticloadbalancing.amazonaws.com/doc/2012-06-01/\">\
         <DescribeInstanceHealthResult><InstanceStates>{members}</InstanceStates>\
         </DescribeInstanceHealthResult><ResponseMetadata><RequestId>rigger-lab</RequestId>\
         </ResponseMetadata></DescribeInstanceHealthResponse>"
    )
}

/// One entry of a DescribeTargetHealth answer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TargetHealth {
    id: String,
    port: i32,
    health_check_port: Option<String>,
    state: String,
    reason: Option<String>,
    description: Option<String>,
}

/// The emulator's DescribeTargetHealth entries.
fn parse_target_health(xml: &str) -> Vec<TargetHealth> {
    let Some(list) = element(xml, "TargetHealthDescriptions") else {
        return Vec::new();
    };
    elements(list, "member")
        .into_iter()
        .filter_map(|member| {
            let target = element(member, "Target")?;
            let health = element(member, "TargetHealth");
            Some(TargetHealth {
                id: element(target, "Id")?.to_owned(),
                port: element(target, "Port")?.parse().ok()?,
                health_check_port: element(member, "HealthCheckPort").map(str::to_owned),
                state: health
                    .and_then(|h| element(h, "State"))
                    .unwrap_or("unavailable")
                    .to_owned(),
                reason: health.and_then(|h| element(h, "Reason")).map(str::to_owned),
                description: health
                    .and_then(|h| element(h, "Description"))
                    .map(str::to_owned),
            })
        })
        .collect()
}

/// The lab's answer to DescribeTargetHealth: the emulator's registration (`emulator`: the
/// registered targets, or the ones `asked` for) with HAProxy's health (`served`: none when no
/// served load balancer forwards to the group).
fn target_health(
    emulator: &[TargetHealth],
    served: Option<&[(Member, Health)]>,
    asked: bool,
) -> Vec<TargetHealth> {
    let says =
        |entry: &TargetHealth, state: &str, reason: Option<&str>, description: &str| TargetHealth {
            state: state.to_owned(),
            reason: reason.map(str::to_owned),
            description: (!description.is_empty()).then(|| description.to_owned()),
            ..entry.clone()
        };
    let mut answer: Vec<TargetHealth> = emulator
        .iter()
        .map(|entry| {
            let found = served.and_then(|members| {
                members
                    .iter()
                    .find(|(m, _)| m.id == entry.id && m.port == entry.port)
            });
            match (served, found) {
                // Deregistered a moment ago and still finishing its connections.
                (_, Some((_, Health::Draining))) => says(
                    entry,
                    "draining",
                    Some("Target.DeregistrationInProgress"),
                    "Target deregistration is in progress",
                ),
                // The emulator's word stands for what it knows better (not registered,
                // stopped).
                _ if entry.state != "healthy" => entry.clone(),
                (None, _) => says(
                    entry,
                    "unused",
                    Some("Target.NotInUse"),
                    "Target group is not configured to receive traffic from the load balancer",
                ),
                (Some(_), None) => says(
                    entry,
                    "initial",
                    Some("Elb.RegistrationInProgress"),
                    "Target registration is in progress",
                ),
                (Some(_), Some((_, health))) => match health {
                    Health::InService => says(entry, "healthy", None, ""),
                    Health::Initial { checked: false } => says(
                        entry,
                        "initial",
                        Some("Elb.RegistrationInProgress"),
                        "Target registration is in progress",
                    ),
                    Health::Initial { checked: true } => says(
                        entry,
                        "initial",
                        Some("Elb.InitialHealthChecking"),
                        "Initial health checks in progress",
                    ),
                    Health::Failing { check, code } => match (check.as_str(), code) {
                        ("L7STS", Some(code)) => says(
                            entry,
                            "unhealthy",
                            Some("Target.ResponseCodeMismatch"),
                            &format!("Health checks failed with these codes: [{code}]"),
                        ),
                        ("L4TOUT" | "L6TOUT" | "L7TOUT", _) => says(
                            entry,
                            "unhealthy",
                            Some("Target.Timeout"),
                            "Request timed out",
                        ),
                        _ => says(
                            entry,
                            "unhealthy",
                            Some("Target.FailedHealthChecks"),
                            "Health checks failed",
                        ),
                    },
                    Health::NoMachine => says(
                        entry,
                        "unused",
                        Some("Target.InvalidState"),
                        "Target is in the stopped state",
                    ),
                    Health::Unchecked => says(
                        entry,
                        "unavailable",
                        Some("Target.HealthCheckDisabled"),
                        "Health checks are disabled",
                    ),
                    Health::Draining => unreachable!("matched above"),
                },
            }
        })
        .collect();
    // Draining targets are listed too (the emulator forgets them at deregistration).
    if !asked {
        for (member, health) in served.unwrap_or_default() {
            let listed = answer
                .iter()
                .any(|e| e.id == member.id && e.port == member.port);
            if *health == Health::Draining && !listed {
                answer.push(TargetHealth {
                    id: member.id.clone(),
                    port: member.port,
                    health_check_port: None,
                    state: "draining".to_owned(),
                    reason: Some("Target.DeregistrationInProgress".to_owned()),
                    description: Some("Target deregistration is in progress".to_owned()),
                });
            }
        }
    }
    answer
}

/// DescribeTargetHealth's answer for `entries`, in ELBv2's words.
fn target_health_xml(entries: &[TargetHealth]) -> String {
    let mut members = String::new();
    for entry in entries {
        let _ = write!(
            members,
            "<member><Target><Id>{}</Id><Port>{}</Port></Target>",
            escape(&entry.id),
            entry.port
        );
        if let Some(port) = &entry.health_check_port {
            let _ = write!(
                members,
                "<HealthCheckPort>{}</HealthCheckPort>",
                escape(port)
            );
        }
        let _ = write!(
            members,
            "<TargetHealth><State>{}</State>",
            escape(&entry.state)
        );
        if let Some(reason) = &entry.reason {
            let _ = write!(members, "<Reason>{}</Reason>", escape(reason));
        }
        if let Some(description) = &entry.description {
            let _ = write!(
                members,
                "<Description>{}</Description>",
                escape(description)
            );
        }
        members.push_str("</TargetHealth></member>");
    }
    format!(
        "<DescribeTargetHealthResponse xmlns=\"http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/\">\
         <DescribeTargetHealthResult><TargetHealthDescriptions>{members}</TargetHealthDescriptions>\
         </DescribeTargetHealthResult><ResponseMetadata><RequestId>rigger-lab</RequestId>\
         </ResponseMetadata></DescribeTargetHealthResponse>"
    )
}

/// The text inside the first `<tag>` of `xml`.
fn element<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    elements(xml, tag).into_iter().next()
}

/// The texts inside every `<tag>` of `xml` at its level (elements of the same name do not
/// nest in the answers read here).
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut found = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else {
            break;
        };
        found.push(&after[..end]);
        rest = &after[end + close.len()..];
    }
    found
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classic() -> LabLoadBalancer {
        LabLoadBalancer {
            name: "site-lb".into(),
            dns_name: "site-lb-1.us-east-1.elb.amazonaws.com".into(),
            listeners: vec![
                (80, "HTTP".into(), 80, "HTTP".into()),
                (443, "HTTPS".into(), 443, "HTTPS".into()),
            ],
            health_target: "HTTPS:443/healthcheck.html".into(),
            interval_seconds: 10,
            timeout_seconds: 5,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            instances: vec!["i-0a".into(), "i-0b".into()],
        }
    }

    fn group(name: &str, protocol: &str, port: i32) -> LabTargetGroup {
        LabTargetGroup {
            arn: format!("arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/{name}/1"),
            name: name.into(),
            protocol: protocol.into(),
            port,
            health_enabled: true,
            health_protocol: "HTTPS".into(),
            health_port: Some(443),
            health_path: "/healthcheck.html".into(),
            interval_seconds: 15,
            timeout_seconds: 5,
            healthy_threshold: 3,
            unhealthy_threshold: 2,
            matcher: "200-299".into(),
            deregistration_delay_seconds: 30,
            load_balancer_arns: vec!["arn:alb".into()],
            targets: vec![("i-0a".into(), port), ("i-0b".into(), port)],
        }
    }

    fn application() -> Emulated {
        let (https, http) = (
            group("app-lb-443", "HTTPS", 443),
            group("app-lb-80", "HTTP", 80),
        );
        Emulated {
            classic: Vec::new(),
            application: vec![LabApplicationLoadBalancer {
                name: "app-lb".into(),
                arn: "arn:alb".into(),
                dns_name: "app-lb-1.us-east-1.elb.amazonaws.com".into(),
                listeners: vec![
                    (80, "HTTP".into(), Some(http.arn.clone())),
                    (443, "HTTPS".into(), Some(https.arn.clone())),
                    (8080, "HTTP".into(), None),
                ],
            }],
            target_groups: vec![https, http, group("unattached", "HTTP", 80)],
        }
    }

    fn machines() -> HashMap<String, Ipv4Addr> {
        [("i-0a".to_owned(), Ipv4Addr::new(172, 31, 0, 4))].into()
    }

    fn address(_: Kind, _: &str) -> Option<Ipv4Addr> {
        Some(Ipv4Addr::new(127, 31, 5, 10))
    }

    fn has_lines(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(text.lines().any(|l| l == *line), "{line:?} in\n{text}");
        }
    }

    #[test]
    fn a_classic_load_balancers_check_and_listeners_are_its_own() {
        let emulated = Emulated {
            classic: vec![classic()],
            ..Emulated::default()
        };
        let layout = plan(&emulated, address, &machines());
        let text = render(&layout, Path::new("/l/haproxy"), "rigger-lab-x");
        has_lines(
            &text,
            &[
                "  bind 127.31.5.10:443 ssl crt /l/haproxy/elb-site-lb.pem",
                "  bind 127.31.5.10:80",
                "  default_backend elb-site-lb-443",
                "  option httpchk GET /healthcheck.html",
                "  http-check expect status 200",
                "  timeout check 5s",
                "  default-server inter 10s rise 2 fall 3",
                "  server i-0a-443 172.31.0.4:443 namespace rigger-lab-x ssl verify none check",
                "  server i-0a-80 172.31.0.4:80 namespace rigger-lab-x track elb-site-lb-443/i-0a-443",
                "  http-request set-header X-Forwarded-Proto https",
                "  http-request set-header X-Forwarded-Port 443",
            ],
        );
        assert!(
            !text.contains("i-0b"),
            "an instance without a machine has no server"
        );
        assert_eq!(
            layout.balancers[0].checked_pool.as_deref(),
            Some("elb-site-lb-443")
        );
    }

    #[test]
    fn an_application_load_balancer_forwards_each_listener_to_its_target_group() {
        let mut emulated = application();
        emulated.target_groups[1].health_port = None;
        emulated.target_groups[1].health_protocol = "HTTP".into();
        emulated.target_groups[1].matcher = "200,302".into();
        let layout = plan(&emulated, address, &machines());
        let pools: Vec<&str> = layout.pools.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            pools,
            ["tg-app-lb-80", "tg-app-lb-443"],
            "unattached groups are not served"
        );
        let text = render(&layout, Path::new("/l/haproxy"), "rigger-lab-x");
        has_lines(
            &text,
            &[
                "frontend alb-app-lb:443",
                "  bind 127.31.5.10:443 ssl crt /l/haproxy/alb-app-lb.pem",
                "  default_backend tg-app-lb-443",
                "  default_backend tg-app-lb-80",
                "  http-check expect status 200-299",
                "  http-check expect status 200,302",
                "  default-server inter 15s rise 3 fall 2",
                "  server i-0a-443 172.31.0.4:443 namespace rigger-lab-x ssl verify none check",
                // HTTP traffic, checked on the traffic port over HTTP.
                "  server i-0a-80 172.31.0.4:80 namespace rigger-lab-x check",
                "frontend alb-app-lb:8080",
            ],
        );
        let forwarding_nowhere = text.split("frontend alb-app-lb:8080").nth(1).unwrap();
        assert!(
            !forwarding_nowhere
                .split("\nbackend")
                .next()
                .unwrap()
                .contains("default_backend"),
            "{text}"
        );
        // An HTTPS check of HTTP targets on another port, and TLS targets checked in clear.
        let mut pool = target_group_pool(&group("g", "HTTP", 8000), "tg-g", &machines());
        let text = render(
            &Layout {
                balancers: Vec::new(),
                pools: vec![pool.clone()],
            },
            Path::new("/l"),
            "n",
        );
        has_lines(
            &text,
            &[
                "  server i-0a-8000 172.31.0.4:8000 namespace n check port 443 check-ssl verify none",
            ],
        );
        pool.protocol = "HTTPS".into();
        if let Check::Own(check) = &mut pool.check {
            check.protocol = "HTTP".into();
        }
        let text = render(
            &Layout {
                balancers: Vec::new(),
                pools: vec![pool],
            },
            Path::new("/l"),
            "n",
        );
        has_lines(
            &text,
            &[
                "  server i-0a-8000 172.31.0.4:8000 namespace n ssl verify none check port 443 no-check-ssl",
            ],
        );
    }

    /// HAProxy itself (`haproxy -c`, installed by scripts/install-packages.sh) takes what
    /// `render` writes, for both kinds at once.
    #[test]
    fn haproxy_takes_the_configuration() {
        let mut emulated = application();
        emulated.classic.push(classic());
        let layout = plan(&emulated, address, &machines());
        let dir = tempfile::tempdir().unwrap();
        for served in &layout.balancers {
            let pem = dir
                .path()
                .join(format!("{}-{}.pem", served.kind.prefix(), served.name));
            let made = std::process::Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                ])
                .args(["-subj", "/CN=lb", "-keyout"])
                .arg(&pem)
                .arg("-out")
                .arg(pem.with_extension("crt"))
                .output()
                .unwrap();
            assert!(made.status.success(), "{made:?}");
            let certificate = std::fs::read_to_string(pem.with_extension("crt")).unwrap();
            let key = std::fs::read_to_string(&pem).unwrap();
            std::fs::write(&pem, certificate + &key).unwrap();
        }
        let config = dir.path().join("haproxy.cfg");
        // HAProxy opens a server's namespace while it reads the file: this test makes none,
        // so its servers are checked without one.
        let text =
            render(&layout, dir.path(), "rigger-lab-x").replace(" namespace rigger-lab-x", "");
        std::fs::write(&config, text).unwrap();
        let checked = std::process::Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&config)
            .output()
            .expect("haproxy (scripts/install-packages.sh installs it)");
        assert!(
            checked.status.success(),
            "{}{}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        );
    }

    #[test]
    fn servers_are_read_from_haproxys_stats() {
        let stats = "# pxname,svname,qcur,scur,status,weight,check_status,check_code\n\
                     tg-a,FRONTEND,,0,OPEN,,,\n\
                     tg-a,i-0a-443,0,2,UP,1,L7OK,200\n\
                     tg-a,i-0b-443,0,0,DOWN,1,L7STS,503\n\
                     tg-a,i-0c-443,0,0,UP 1/2,1,* L4CON,\n\
                     tg-a,i-0d-443,0,0,DOWN,1,INI,\n\
                     tg-a,i-0e-443,0,1,DRAIN,1,L7OK,200\n\
                     tg-a,BACKEND,0,3,UP,1,,\n";
        let views = parse_stats(stats);
        assert_eq!(views.len(), 5);
        assert_eq!(
            views["tg-a/i-0a-443"],
            ServerView {
                up: true,
                last_check: "L7OK".into(),
                code: Some(200),
                sessions: 2
            }
        );
        assert_eq!(views["tg-a/i-0b-443"].code, Some(503));
        assert_eq!(views["tg-a/i-0c-443"].last_check, "L4CON");
        assert!(views["tg-a/i-0e-443"].up);
        assert_eq!(views["tg-a/i-0e-443"].sessions, 1);
    }

    #[test]
    fn health_is_haproxys_view_with_elbs_initial_state() {
        let member = Member {
            id: "i-0a".into(),
            port: 443,
            address: Some(Ipv4Addr::new(172, 31, 0, 4)),
            draining: false,
        };
        let check = plan(
            &Emulated {
                classic: vec![classic()],
                ..Emulated::default()
            },
            address,
            &machines(),
        )
        .pools[1]
            .check
            .clone();
        let view = |up: bool, last: &str, code: Option<u16>| ServerView {
            up,
            last_check: last.into(),
            code,
            sessions: 0,
        };
        let of = |view: Option<ServerView>, ever_up: bool| {
            health_of(&member, &check, view.as_ref(), ever_up)
        };
        assert_eq!(
            of(Some(view(true, "L7OK", Some(200))), false),
            Health::InService
        );
        assert_eq!(
            of(Some(view(true, "L4CON", None)), true),
            Health::InService,
            "one failed check, below the unhealthy threshold: still in service"
        );
        assert_eq!(
            of(Some(view(true, "INI", None)), false),
            Health::Initial { checked: false },
            "HAProxy counts an unchecked server up, ELB does not"
        );
        assert_eq!(of(None, false), Health::Initial { checked: false });
        assert_eq!(
            of(Some(view(false, "L7OK", Some(200))), false),
            Health::Initial { checked: true },
            "passing, not yet the healthy threshold"
        );
        assert_eq!(
            of(Some(view(false, "L7OK", Some(200))), true),
            Health::Failing {
                check: "L7OK".into(),
                code: Some(200)
            },
            "was in service, failed, recovering: failing until the healthy threshold"
        );
        assert_eq!(
            of(Some(view(false, "L7STS", Some(503))), false),
            Health::Failing {
                check: "L7STS".into(),
                code: Some(503)
            }
        );
        let stopped = Member {
            address: None,
            ..member.clone()
        };
        assert_eq!(health_of(&stopped, &check, None, false), Health::NoMachine);
        assert_eq!(
            health_of(&member, &Check::Off, None, false),
            Health::Unchecked
        );
    }

    #[test]
    fn a_load_balancer_keeps_its_address_when_another_comes_or_goes() {
        let state = tempfile::tempdir().unwrap();
        let balancers = Balancers::new(&Lab::new(state.path(), Path::new("/i")).unwrap());
        let key = |name: &str| (Kind::Classic, name.to_owned());
        let first = balancers.assign_hosts(&[key("b"), key("c")]);
        assert_eq!(first, [(key("b"), 10), (key("c"), 11)].into());
        let second = balancers.assign_hosts(&[key("a"), key("c")]);
        assert_eq!(second, [(key("a"), 10), (key("c"), 11)].into());
        let third =
            balancers.assign_hosts(&[key("a"), key("c"), (Kind::Application, "a".to_owned())]);
        assert_eq!(third[&(Kind::Application, "a".to_owned())], 12);
    }

    /// Two targets behind the application load balancer, served as planned, and the same
    /// with `leaving` deregistered while HAProxy counts a connection on it.
    struct Deregistering {
        _state: tempfile::TempDir,
        balancers: Balancers,
        addresses: HashMap<String, Ipv4Addr>,
        emulated: Emulated,
        deregistered: Emulated,
        busy: BTreeMap<String, ServerView>,
    }

    fn deregistering(leaving: &str) -> Deregistering {
        let state = tempfile::tempdir().unwrap();
        let balancers = Balancers::new(&Lab::new(state.path(), Path::new("/i")).unwrap());
        let addresses: HashMap<String, Ipv4Addr> = [
            ("i-0a".to_owned(), Ipv4Addr::new(172, 31, 0, 4)),
            ("i-0b".to_owned(), Ipv4Addr::new(172, 31, 0, 5)),
        ]
        .into();
        let emulated = application();
        *balancers.layout.lock().unwrap() = plan(&emulated, address, &addresses);
        let mut deregistered = emulated.clone();
        deregistered.target_groups[0]
            .targets
            .retain(|t| t.0 != leaving);
        let busy = [(
            format!("tg-app-lb-443/{leaving}-443"),
            ServerView {
                up: true,
                last_check: "L7OK".into(),
                code: Some(200),
                sessions: 1,
            },
        )]
        .into();
        Deregistering {
            _state: state,
            balancers,
            addresses,
            emulated,
            deregistered,
            busy,
        }
    }

    #[test]
    fn a_deregistered_target_drains_while_it_has_connections() {
        let Deregistering {
            balancers,
            addresses,
            emulated,
            deregistered,
            busy,
            ..
        } = deregistering("i-0b");
        let mut wanted = plan(&deregistered, address, &addresses);
        balancers.drain(&mut wanted, &busy);
        let pool = wanted.pool("tg-app-lb-443").unwrap();
        assert_eq!(pool.members.len(), 2, "{pool:?}");
        assert!(pool.members[1].draining && pool.members[1].id == "i-0b");
        let health = balancers.pool_health(&wanted, pool, &BTreeMap::new());
        assert_eq!(health[1].1, Health::Draining);
        // Its connections ended: gone (the next round).
        *balancers.layout.lock().unwrap() = wanted;
        let mut wanted = plan(&deregistered, address, &addresses);
        balancers.drain(&mut wanted, &BTreeMap::new());
        assert_eq!(wanted.pool("tg-app-lb-443").unwrap().members.len(), 1);
        // Without connections a deregistered target leaves at once, as on ALB.
        let mut wanted = plan(&emulated, address, &addresses);
        *balancers.layout.lock().unwrap() = wanted.clone();
        balancers.drain(&mut wanted, &BTreeMap::new());
        let mut wanted = plan(&deregistered, address, &addresses);
        balancers.drain(&mut wanted, &BTreeMap::new());
        assert_eq!(wanted.pool("tg-app-lb-443").unwrap().members.len(), 1);
    }

    #[test]
    fn a_draining_target_keeps_its_place_so_haproxy_is_not_reloaded() {
        let Deregistering {
            balancers,
            addresses,
            emulated,
            deregistered,
            busy,
            ..
        } = deregistering("i-0a");
        let config = render(
            &plan(&emulated, address, &addresses),
            Path::new("/d"),
            "lab",
        );
        let mut wanted = plan(&deregistered, address, &addresses);
        balancers.drain(&mut wanted, &busy);
        let pool = wanted.pool("tg-app-lb-443").unwrap();
        assert!(
            pool.members[0].draining && pool.members[0].id == "i-0a",
            "{pool:?}"
        );
        assert_eq!(render(&wanted, Path::new("/d"), "lab"), config);
    }

    #[test]
    fn instance_health_answers_as_elb_does() {
        let health = [
            ("i-0a".to_owned(), Health::InService),
            (
                "i-0b".to_owned(),
                Health::Failing {
                    check: "L4CON".into(),
                    code: None,
                },
            ),
            ("i-0c".to_owned(), Health::Initial { checked: false }),
        ];
        let xml = instance_health_xml(&health, &[]);
        assert!(xml.contains("<InstanceId>i-0a</InstanceId><State>InService</State>"));
        assert!(xml.contains("<InstanceId>i-0b</InstanceId><State>OutOfService</State><ReasonCode>Instance</ReasonCode>"));
        assert!(xml.contains("<Description>Instance registration is still in progress.</Description><InstanceId>i-0c</InstanceId><State>OutOfService</State><ReasonCode>ELB</ReasonCode>"));
        let only = instance_health_xml(&health, &["i-0b"]);
        assert!(!only.contains("i-0a"));
        assert_eq!(
            parse_target("HTTPS:443/healthcheck.html"),
            ("HTTPS".into(), 443, "/healthcheck.html".into())
        );
        assert_eq!(parse_target("TCP:22"), ("TCP".into(), 22, String::new()));
    }

    /// What moto answers to DescribeTargetHealth (every target "healthy").
    const EMULATOR_TARGET_HEALTH: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
        <DescribeTargetHealthResponse xmlns=\"http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/\">\
        <DescribeTargetHealthResult><TargetHealthDescriptions>\
        <member><Target><Id>i-0a</Id><Port>443</Port></Target><HealthCheckPort>443</HealthCheckPort>\
        <TargetHealth><State>healthy</State></TargetHealth></member>\
        <member><Target><Id>i-0b</Id><Port>443</Port></Target><HealthCheckPort>443</HealthCheckPort>\
        <TargetHealth><State>healthy</State></TargetHealth></member>\
        <member><Target><Id>i-0c</Id><Port>443</Port></Target><HealthCheckPort>443</HealthCheckPort>\
        <TargetHealth><State>unused</State><Reason>Target.InvalidState</Reason>\
        <Description>Target is in the stopped state</Description></TargetHealth></member>\
        </TargetHealthDescriptions></DescribeTargetHealthResult>\
        <ResponseMetadata><RequestId>r</RequestId></ResponseMetadata></DescribeTargetHealthResponse>";

    #[test]
    fn target_health_is_haproxys_view_in_elbv2s_words() {
        let emulator = parse_target_health(EMULATOR_TARGET_HEALTH);
        assert_eq!(emulator.len(), 3);
        assert_eq!(emulator[2].reason.as_deref(), Some("Target.InvalidState"));
        let member = |id: &str, draining: bool| Member {
            id: id.into(),
            port: 443,
            address: Some(Ipv4Addr::new(172, 31, 0, 4)),
            draining,
        };
        let served = [
            (
                member("i-0a", false),
                Health::Failing {
                    check: "L7STS".into(),
                    code: Some(503),
                },
            ),
            (member("i-0d", true), Health::Draining),
        ];
        let answer = target_health(&emulator, Some(&served), false);
        let states: Vec<(&str, &str, Option<&str>)> = answer
            .iter()
            .map(|t| (t.id.as_str(), t.state.as_str(), t.reason.as_deref()))
            .collect();
        assert_eq!(
            states,
            [
                ("i-0a", "unhealthy", Some("Target.ResponseCodeMismatch")),
                ("i-0b", "initial", Some("Elb.RegistrationInProgress")),
                ("i-0c", "unused", Some("Target.InvalidState")),
                ("i-0d", "draining", Some("Target.DeregistrationInProgress")),
            ]
        );
        assert_eq!(
            answer[0].description.as_deref(),
            Some("Health checks failed with these codes: [503]")
        );
        let asked = target_health(&emulator[..1], Some(&served), true);
        assert_eq!(asked.len(), 1, "only the targets asked for");
        let healthy = [(member("i-0a", false), Health::InService)];
        let answer = target_health(&emulator[..1], Some(&healthy), false);
        assert_eq!(
            (answer[0].state.as_str(), answer[0].reason.as_deref()),
            ("healthy", None)
        );
        let unserved = target_health(&emulator[..1], None, false);
        assert_eq!(unserved[0].reason.as_deref(), Some("Target.NotInUse"));
        let xml = target_health_xml(&answer);
        assert!(xml.contains("<member><Target><Id>i-0a</Id><Port>443</Port></Target><HealthCheckPort>443</HealthCheckPort><TargetHealth><State>healthy</State></TargetHealth></member>"), "{xml}");
        assert_eq!(parse_target_health(&xml), answer, "reads back");
    }
}
