//! The lab's load balancers: every classic load balancer of the emulator is HAProxy on this
//! machine, with its listeners, its health check and its registered instances as backends,
//! and what rigger reads back about instance health is HAProxy's own view.
//!
//! - One HAProxy (master-worker, a cgroup of the lab's, a pid record) serves every load
//!   balancer. Load balancer number `i` (in name order) listens on this machine's loopback at
//!   [`Lab::loopback_address`]`(10 + i)`, on each of its listeners' ports. Backends are the
//!   registered instances at their private addresses, reached in the lab's namespace
//!   (HAProxy's `namespace` keyword): nothing of the lab is routed from this machine.
//! - HTTPS listeners terminate TLS with a certificate of the lab's CA for the load balancer's
//!   name and address: the emulator never gives back an uploaded certificate's private key.
//!   Connections to instances are TLS again when the instance protocol is HTTPS (not
//!   verified, as ELB does not verify instances' certificates).
//! - The health check is the load balancer's (`HTTPS:443/healthcheck.html`, interval,
//!   timeout, thresholds). An instance starts out of service and needs the healthy threshold
//!   of passing checks, as on ELB: a server HAProxy has not seen before is set down through its
//!   runtime API after each (re)load, and the state of the others is carried across reloads.
//! - [`Balancers`] is an [`Edge`] of the front: `DescribeInstanceHealth` is answered from
//!   HAProxy's `show stat`, and `DescribeLoadBalancers` names each load balancer by its
//!   loopback address instead of its DNS name (which resolves nowhere), so the URL rigger
//!   prints works from this machine.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use rigger_aws::lab::LabLoadBalancer;
use rigger_local::process::{self, ProcessSpec, Supervised};

use crate::front::{Edge, EmulatorCall};
use crate::layout::Lab;
use crate::sys;

/// The first host number of the load balancers in the lab's loopback block.
pub const FIRST_LOOPBACK_HOST: u8 = 10;

/// A load balancer as the lab runs it: the emulator's description, its loopback address and
/// its backends' addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub lb: LabLoadBalancer,
    pub address: Ipv4Addr,
    /// Instance id -> private address (instances without a machine are left out).
    pub backends: BTreeMap<String, Ipv4Addr>,
}

/// The lab's HAProxy and what it serves.
pub struct Balancers {
    dir: PathBuf,
    namespace: String,
    lab: Lab,
    process: Mutex<Option<Supervised>>,
    /// What HAProxy was last configured with.
    running: Mutex<Vec<Running>>,
    /// Servers (`backend/server`) HAProxy knows, so that only new ones are set down.
    known: Mutex<BTreeSet<String>>,
    /// Each load balancer's host number in the lab's loopback block, kept while it exists so
    /// that another's creation or deletion never moves it.
    hosts: Mutex<BTreeMap<String, u8>>,
}

/// An instance's health behind a lab load balancer, from HAProxy's view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Its last check passed and HAProxy has it up.
    InService,
    /// Not checked enough yet since it was registered (ELB: "registration is still in
    /// progress").
    Initial,
    /// Its checks fail (down, or going down with a failed last check).
    Failing,
    /// Registered, but no running machine has its address.
    NoMachine,
}

impl Balancers {
    pub fn new(lab: &Lab) -> Balancers {
        Balancers {
            dir: lab.state.join("haproxy"),
            namespace: lab.namespace(),
            lab: lab.clone(),
            process: Mutex::new(None),
            running: Mutex::new(Vec::new()),
            known: Mutex::new(BTreeSet::new()),
            hosts: Mutex::new(BTreeMap::new()),
        }
    }

    /// Host numbers for `names` (sorted): the ones they had, the lowest free for new ones;
    /// names gone release theirs. A load balancer with no host left is not served.
    fn assign_hosts(&self, names: &[&str]) -> BTreeMap<String, u8> {
        let mut hosts = self.hosts.lock().expect("lock");
        hosts.retain(|name, _| names.contains(&name.as_str()));
        for name in names {
            if hosts.contains_key(*name) {
                continue;
            }
            let taken: BTreeSet<u8> = hosts.values().copied().collect();
            match (FIRST_LOOPBACK_HOST..=254).find(|host| !taken.contains(host)) {
                Some(host) => {
                    hosts.insert((*name).to_owned(), host);
                }
                None => tracing::warn!(%name, "no loopback address left for this load balancer"),
            }
        }
        hosts.clone()
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("stats.sock")
    }

    /// Makes HAProxy serve `lbs` (addresses of the instances from `addresses`), starting,
    /// reloading or stopping it when that changes.
    pub async fn converge(
        &self,
        mut lbs: Vec<LabLoadBalancer>,
        addresses: &HashMap<String, Ipv4Addr>,
        pki: &crate::pki::Pki,
    ) -> anyhow::Result<()> {
        lbs.sort_by(|a, b| a.name.cmp(&b.name));
        let hosts = self.assign_hosts(&lbs.iter().map(|lb| lb.name.as_str()).collect::<Vec<_>>());
        let wanted: Vec<Running> = lbs
            .into_iter()
            .filter_map(|lb| Some((*hosts.get(&lb.name)?, lb)))
            .map(|(host, lb)| Running {
                address: self.lab.loopback_address(host),
                backends: lb
                    .instances
                    .iter()
                    .filter_map(|id| Some((id.clone(), *addresses.get(id)?)))
                    .collect(),
                lb,
            })
            .collect();
        if *self.running.lock().expect("lock") == wanted {
            return Ok(());
        }
        if wanted.is_empty() {
            self.stop().await;
            *self.running.lock().expect("lock") = wanted;
            return Ok(());
        }
        sys::create_trusted_dir(&self.dir, 0o700)?;
        for running in &wanted {
            let pem = self.dir.join(format!("{}.pem", running.lb.name));
            if !pem.exists() {
                let (certificate, key) = (pem.with_extension("crt"), pem.with_extension("key"));
                pki.issue(
                    &certificate,
                    &key,
                    &running.lb.name,
                    &[
                        format!("DNS:{}", running.lb.dns_name),
                        format!("IP:{}", running.address),
                    ],
                )?;
                let text = std::fs::read_to_string(&certificate)? + &std::fs::read_to_string(&key)?;
                write_private(&pem, &text)?;
            }
        }
        let config = render(&wanted, &self.dir, &self.namespace);
        // Carry the servers' health across the reload (a reload must not put a failing server
        // back in service).
        if let Ok(state) = self.command("show servers state") {
            write_private(&self.dir.join("server-state"), &state)?;
        }
        write_private(&self.dir.join("haproxy.cfg"), &config)?;
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
        }
        // New servers start out of service, as on ELB: set down once the (new) worker answers.
        let servers: BTreeSet<String> = wanted
            .iter()
            .flat_map(|r| {
                r.lb.listeners.iter().flat_map(move |l| {
                    r.backends
                        .keys()
                        .map(move |id| format!("{}/{id}", backend_name(&r.lb.name, l.2)))
                })
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
        *self.known.lock().expect("lock") = servers;
        *self.running.lock().expect("lock") = wanted;
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

    /// Stops HAProxy.
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
        *self.running.lock().expect("lock") = Vec::new();
    }

    /// One command on HAProxy's runtime API; its answer.
    fn command(&self, line: &str) -> std::io::Result<String> {
        let mut stream = UnixStream::connect(self.socket())?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(format!("{line}\n").as_bytes())?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    }

    /// Each instance's health behind load balancer `name`, in registration order.
    pub fn health(&self, name: &str) -> Option<Vec<(String, Health)>> {
        let running = self.running.lock().expect("lock").clone();
        let lb = running.iter().find(|r| r.lb.name == name)?;
        let stats = self.command("show stat").unwrap_or_default();
        Some(instance_health(lb, &server_health(&stats)))
    }

    /// Every load balancer served, with its backends' health, for the lab's status.
    pub fn status(&self) -> Vec<crate::status::BalancerStatus> {
        let running = self.running.lock().expect("lock").clone();
        if running.is_empty() {
            return Vec::new();
        }
        let servers = server_health(&self.command("show stat").unwrap_or_default());
        running
            .iter()
            .map(|r| crate::status::BalancerStatus {
                name: r.lb.name.clone(),
                kind: "classic".to_owned(),
                address: r.address.to_string(),
                url: url(r),
                backends: instance_health(r, &servers)
                    .into_iter()
                    .map(|(id, health)| crate::status::BackendStatus {
                        address: r.backends.get(&id).map(|a| a.to_string()),
                        state: if health == Health::InService {
                            "in_service"
                        } else {
                            "out_of_service"
                        }
                        .to_owned(),
                        instance_id: id,
                    })
                    .collect(),
            })
            .collect()
    }
}

/// `https://ADDRESS/` for a load balancer with an HTTPS listener on 443, as rigger's
/// status prints it, else `http://ADDRESS/`.
fn url(running: &Running) -> String {
    let https = running
        .lb
        .listeners
        .iter()
        .any(|l| l.0 == 443 && l.1.eq_ignore_ascii_case("HTTPS"));
    format!(
        "{}://{}/",
        if https { "https" } else { "http" },
        running.address
    )
}

/// Each registered instance's health behind `lb`, given HAProxy's servers' health.
fn instance_health(lb: &Running, servers: &BTreeMap<String, Health>) -> Vec<(String, Health)> {
    let checked = health_backend(&lb.lb);
    lb.lb
        .instances
        .iter()
        .map(|id| {
            let server = format!("{}/{id}", backend_name(&lb.lb.name, checked));
            let health = if lb.backends.contains_key(id) {
                servers.get(&server).copied().unwrap_or(Health::Initial)
            } else {
                Health::NoMachine
            };
            (id.clone(), health)
        })
        .collect()
}

/// The backend of load balancer `lb`'s listeners to instance port `port`.
fn backend_name(lb: &str, port: i32) -> String {
    format!("{lb}-{port}")
}

/// The instance port whose backend carries the health check (the others track it).
fn health_backend(lb: &LabLoadBalancer) -> i32 {
    let (_, port, _) = parse_target(&lb.health_target);
    lb.listeners
        .iter()
        .map(|l| l.2)
        .find(|p| *p == port)
        .or_else(|| lb.listeners.first().map(|l| l.2))
        .unwrap_or(port)
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

/// HAProxy's configuration for `lbs`.
fn render(lbs: &[Running], dir: &Path, namespace: &str) -> String {
    let d = dir.display();
    let mut out = format!(
        "# The rigger lab's load balancers (crates/rigger-lab/src/balancer.rs): made by the lab.\n\
         global\n  stats socket {d}/stats.sock mode 600 level admin expose-fd listeners\n  \
         server-state-file {d}/server-state\n  maxconn 4096\n\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  \
         timeout server 60s\n  load-server-state-from-file global\n"
    );
    for running in lbs {
        let lb = &running.lb;
        if !is_plain(&lb.name) {
            continue;
        }
        let (check_protocol, check_port, check_path) = parse_target(&lb.health_target);
        let checked = health_backend(lb);
        for (lb_port, lb_protocol, instance_port, instance_protocol) in &lb.listeners {
            let ssl = if lb_protocol.eq_ignore_ascii_case("HTTPS")
                || lb_protocol.eq_ignore_ascii_case("SSL")
            {
                format!(" ssl crt {d}/{}.pem", lb.name)
            } else {
                String::new()
            };
            let mode = if lb_protocol.eq_ignore_ascii_case("TCP") {
                "tcp"
            } else {
                "http"
            };
            let backend = backend_name(&lb.name, *instance_port);
            let _ = write!(
                out,
                "\nfrontend {}-{lb_port}\n  mode {mode}\n  bind {}:{lb_port}{ssl}\n",
                lb.name, running.address
            );
            if mode == "http" {
                let _ = writeln!(out, "  option forwardfor");
                let proto = if ssl.is_empty() { "http" } else { "https" };
                let _ = writeln!(out, "  http-request set-header X-Forwarded-Proto {proto}");
            }
            let _ = writeln!(out, "  default_backend {backend}");
            if out.contains(&format!("\nbackend {backend}\n")) {
                continue;
            }
            let _ = write!(out, "\nbackend {backend}\n  mode {mode}\n");
            let server_ssl = if instance_protocol.eq_ignore_ascii_case("HTTPS")
                || instance_protocol.eq_ignore_ascii_case("SSL")
            {
                " ssl verify none"
            } else {
                ""
            };
            let tracked = *instance_port != checked;
            if !tracked {
                if matches!(check_protocol.as_str(), "HTTP" | "HTTPS") && is_plain(&check_path) {
                    let _ = writeln!(out, "  option httpchk GET {check_path}");
                    let _ = writeln!(out, "  http-check expect status 200");
                }
                let _ = writeln!(
                    out,
                    "  timeout check {}s\n  default-server inter {}s rise {} fall {}",
                    lb.timeout_seconds.max(1),
                    lb.interval_seconds.max(1),
                    lb.healthy_threshold.max(1),
                    lb.unhealthy_threshold.max(1)
                );
            }
            for (id, address) in &running.backends {
                let check = if tracked {
                    format!(" track {}/{id}", backend_name(&lb.name, checked))
                } else {
                    let check_ssl = if check_protocol == "HTTPS" || check_protocol == "SSL" {
                        " check-ssl"
                    } else {
                        ""
                    };
                    format!(" check port {check_port}{check_ssl}")
                };
                let _ = writeln!(
                    out,
                    "  server {id} {address}:{instance_port} namespace {namespace}{server_ssl}{check}"
                );
            }
        }
    }
    out
}

/// Every server's (`backend/server`) health in HAProxy's `show stat`.
fn server_health(stats: &str) -> BTreeMap<String, Health> {
    let mut lines = stats.lines();
    let Some(header) = lines.next() else {
        return BTreeMap::new();
    };
    let columns: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
    let at = |name: &str| columns.iter().position(|c| *c == name);
    let (Some(px), Some(sv), Some(status)) = (at("pxname"), at("svname"), at("status")) else {
        return BTreeMap::new();
    };
    let check = at("check_status");
    lines
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            let server = fields.get(sv)?;
            if matches!(*server, "FRONTEND" | "BACKEND") {
                return None;
            }
            let backend = fields.get(px)?;
            // UP and checked: in service, also while going down (`UP 1/3` after a failed
            // check), as ELB keeps an instance in service until the unhealthy threshold of
            // failed checks. HAProxy counts a server it has not checked yet (`INI`) as up, ELB
            // does not. A server that only tracks another has no check status.
            let last = check
                .and_then(|c| fields.get(c))
                .map(|c| c.trim_start_matches("* "))
                .unwrap_or("");
            let health = if fields.get(status)?.starts_with("UP") && last != "INI" {
                Health::InService
            } else if last == "INI" || last.is_empty() {
                Health::Initial
            } else {
                Health::Failing
            };
            Some((format!("{backend}/{server}"), health))
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

/// The balancers as an edge of the front: HAProxy's view of instance health, and load
/// balancers named by their loopback address.
pub struct BalancerEdge(pub Arc<Balancers>);

impl Edge for BalancerEdge {
    fn rewrite(&self, call: &EmulatorCall, _status: u16, body: &[u8]) -> Option<Vec<u8>> {
        if call.service != "elasticloadbalancing" || call.param("Version") != Some("2012-06-01") {
            return None;
        }
        match call.action.as_str() {
            "DescribeInstanceHealth" => {
                let name = call.param("LoadBalancerName")?;
                let asked: Vec<&str> = call
                    .params
                    .iter()
                    .filter(|(k, _)| {
                        k.starts_with("Instances.member.") && k.ends_with(".InstanceId")
                    })
                    .map(|(_, v)| v.as_str())
                    .collect();
                match self.0.health(name) {
                    Some(health) => Some(instance_health_xml(&health, &asked).into_bytes()),
                    // Not served yet (created a moment ago): nothing is in service behind it.
                    None => Some(
                        String::from_utf8_lossy(body)
                            .replace("<State>InService</State>", "<State>OutOfService</State>")
                            .into_bytes(),
                    ),
                }
            }
            "DescribeLoadBalancers" => {
                let mut text = String::from_utf8(body.to_vec()).ok()?;
                let running = self.0.running.lock().expect("lock").clone();
                for lb in &running {
                    if !lb.lb.dns_name.is_empty() {
                        text = text.replace(&lb.lb.dns_name, &lb.address.to_string());
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
            Health::InService => ("InService", "N/A", "N/A"),
            Health::Initial => (
                "OutOfService",
                "ELB",
                "Instance registration is still in progress.",
            ),
            Health::Failing => (
                "OutOfService",
                "Instance",
                "Instance has failed at least the UnhealthyThreshold number of health checks consecutively.",
            ),
            Health::NoMachine => ("OutOfService", "Instance", "Instance is in stopped state."),
        };
        let _ = write!(
            members,
            "<member><Description>{description}</Description><InstanceId>{id}</InstanceId>\
             <State>{state}</State><ReasonCode>{reason}</ReasonCode></member>"
        );
    }
    format!(
        "<DescribeInstanceHealthResponse xmlns=\"http://elasticloadbalancing.amazonaws.com/doc/2012-06-01/\">\
         <DescribeInstanceHealthResult><InstanceStates>{members}</InstanceStates>\
         </DescribeInstanceHealthResult><ResponseMetadata><RequestId>rigger-lab</RequestId>\
         </ResponseMetadata></DescribeInstanceHealthResponse>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lb() -> LabLoadBalancer {
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

    #[test]
    fn the_check_and_listeners_are_the_load_balancers() {
        let running = Running {
            lb: lb(),
            address: Ipv4Addr::new(127, 31, 5, 10),
            backends: [("i-0a".to_owned(), Ipv4Addr::new(172, 31, 0, 4))].into(),
        };
        let text = render(&[running], Path::new("/l/haproxy"), "rigger-lab-x");
        for line in [
            "  bind 127.31.5.10:443 ssl crt /l/haproxy/site-lb.pem",
            "  bind 127.31.5.10:80",
            "  option httpchk GET /healthcheck.html",
            "  default-server inter 10s rise 2 fall 3",
            "  server i-0a 172.31.0.4:443 namespace rigger-lab-x ssl verify none check port 443 check-ssl",
            "  server i-0a 172.31.0.4:80 namespace rigger-lab-x track site-lb-443/i-0a",
            "  http-request set-header X-Forwarded-Proto https",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
        }
        assert!(
            !text.contains("i-0b"),
            "an instance without a machine has no server"
        );
    }

    #[test]
    fn health_is_read_from_haproxys_stats() {
        let stats = "# pxname,svname,qcur,status,weight,check_status\n\
                     site-lb-443,FRONTEND,,OPEN,,\n\
                     site-lb-443,i-0a,0,UP,1,L7OK\n\
                     site-lb-443,i-0b,0,DOWN,1,L4CON\n\
                     site-lb-443,i-0c,0,UP 1/2,1,* L7OK\n\
                     site-lb-443,i-0d,0,UP,1,INI\n\
                     site-lb-443,i-0e,0,UP 1/3,1,L4CON\n\
                     site-lb-443,BACKEND,0,UP,1,\n";
        let health = server_health(stats);
        let of = |server: &str| health.get(&format!("site-lb-443/{server}")).copied();
        assert_eq!(of("i-0a"), Some(Health::InService));
        assert_eq!(of("i-0b"), Some(Health::Failing));
        assert_eq!(
            of("i-0c"),
            Some(Health::InService),
            "going down: still in service"
        );
        assert_eq!(
            of("i-0d"),
            Some(Health::Initial),
            "never checked: out of service"
        );
        assert_eq!(
            of("i-0e"),
            Some(Health::InService),
            "one failed check, below the unhealthy threshold: still in service"
        );
        assert_eq!(health.len(), 5);
    }

    #[test]
    fn registered_instances_are_reported_with_their_health_and_the_url_is_https() {
        let running = Running {
            lb: lb(),
            address: Ipv4Addr::new(127, 31, 5, 10),
            backends: [("i-0a".to_owned(), Ipv4Addr::new(172, 31, 0, 4))].into(),
        };
        let servers: BTreeMap<String, Health> =
            [("site-lb-443/i-0a".to_owned(), Health::Failing)].into();
        assert_eq!(
            instance_health(&running, &servers),
            vec![
                ("i-0a".to_owned(), Health::Failing),
                ("i-0b".to_owned(), Health::NoMachine)
            ]
        );
        assert_eq!(
            instance_health(&running, &BTreeMap::new())[0].1,
            Health::Initial,
            "not in HAProxy's stats yet"
        );
        assert_eq!(url(&running), "https://127.31.5.10/");
    }

    #[test]
    fn a_load_balancer_keeps_its_address_when_another_comes_or_goes() {
        let state = tempfile::tempdir().unwrap();
        let balancers = Balancers::new(&Lab::new(state.path(), Path::new("/i")).unwrap());
        let first = balancers.assign_hosts(&["b", "c"]);
        assert_eq!(first, [("b".to_owned(), 10), ("c".to_owned(), 11)].into());
        let second = balancers.assign_hosts(&["a", "c"]);
        assert_eq!(second, [("a".to_owned(), 10), ("c".to_owned(), 11)].into());
        let third = balancers.assign_hosts(&["a", "c", "d"]);
        assert_eq!(third["d"], 12);
    }

    #[test]
    fn instance_health_answers_as_elb_does() {
        let health = [
            ("i-0a".to_owned(), Health::InService),
            ("i-0b".to_owned(), Health::Failing),
            ("i-0c".to_owned(), Health::Initial),
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
}
