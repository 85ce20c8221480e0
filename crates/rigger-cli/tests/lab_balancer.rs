//! The lab's load balancers end to end, through the real `rigger` binary: two machines whose
//! user-data serves HTTPS on 443 (and HTTP on 80) with `/healthcheck.html`, behind a load
//! balancer created through the lab's endpoint with rigger's listeners (80->80, 443->443 with
//! an uploaded IAM certificate) and health check (HTTPS:443/healthcheck.html).
//!
//! - Classic: HTTPS to the load balancer's loopback address (the one DescribeLoadBalancers
//!   names, the certificate of the lab's CA for it) reaches both; DescribeInstanceHealth is
//!   HAProxy's view: both in service, then the one whose server is stopped goes out of service
//!   within its thresholds (measured) and every request goes to the other; a deregistered
//!   instance leaves HAProxy; a deleted load balancer's frontend is gone.
//! - Application: the same through two target groups; a request in flight survives a reload;
//!   a stopped server is `unhealthy` within the thresholds (measured) and `healthy` again once
//!   it is back; a target deregistered with requests in flight is `draining` until they end;
//!   a deleted load balancer's target groups say `unused` (`Target.NotInUse`).
//!
//! `rigger lab down` leaves nothing. Needs root, the lab image (`rigger lab image`) and moto
//! (scripts/moto.sh); fails, never skips, when one is missing.

mod hermetic;
use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rigger_aws::lab::sdk::{ec2, elb, elbv2};

mod lab_support;
use lab_support::*;

const LB: &str = "lab-balancer-lb";
const ALB: &str = "lab-balancer-alb";
const INTERVAL: i32 = 2;
const UNHEALTHY: i32 = 2;

/// Serves its instance id on `/` (HTTP on 80, HTTPS on 443 with a self-signed certificate),
/// also after 5 s on `/slow`, and `ok` on `/healthcheck.html`, as the `lab-web` unit (so a
/// test can stop it).
const USER_DATA: &str = r#"#!/bin/bash
set -e
install -d /srv/lab
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=lab-web \
  -keyout /srv/lab/key.pem -out /srv/lab/cert.pem 2>/dev/null
cat >/srv/lab/serve.py <<'EOF'
import http.server, ssl, threading, time, urllib.request

def metadata(path):
    token = urllib.request.urlopen(urllib.request.Request(
        "http://169.254.169.254/latest/api/token", method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})).read().decode()
    return urllib.request.urlopen(urllib.request.Request(
        "http://169.254.169.254/latest/meta-data/" + path,
        headers={"X-aws-ec2-metadata-token": token})).read().decode()

INSTANCE = metadata("instance-id")

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/slow":
            time.sleep(5)
        body = (b"ok\n" if self.path == "/healthcheck.html" else (INSTANCE + "\n").encode())
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

def serve(port, tls):
    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain("/srv/lab/cert.pem", "/srv/lab/key.pem")
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()

threading.Thread(target=serve, args=(80, False), daemon=True).start()
serve(443, True)
EOF
systemd-run --unit=lab-web python3 /srv/lab/serve.py
"#;

/// Starts the server again after `systemctl stop lab-web` (a transient unit is gone once
/// stopped).
const START_AGAIN: &str = "sudo systemd-run --unit=lab-web python3 /srv/lab/serve.py";

/// `GET url`, verifying an HTTPS load balancer's certificate with the lab's CA; the body, or
/// `None` when it did not answer 200.
fn fetch(ca: &Path, url: &str) -> Option<String> {
    fetch_or_why(ca, url).ok()
}

/// `GET url` as [`fetch`]: the body, or what went wrong (the status and body, or curl's error).
fn fetch_or_why(ca: &Path, url: &str) -> Result<String, String> {
    let output = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(ca)
        .arg(url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let why = || {
        format!(
            "{url}: {} {text:?} {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
    };
    let (body, code) = text.rsplit_once('\n').ok_or_else(why)?;
    if code == "200" {
        Ok(body.trim().to_owned())
    } else {
        Err(why())
    }
}

/// `GET /` over HTTPS at `address`.
fn get(ca: &Path, address: &str) -> Option<String> {
    fetch(ca, &format!("https://{address}/"))
}

/// Which instances answer `url` in 20 requests.
fn answering(ca: &Path, url: &str) -> BTreeSet<String> {
    (0..20).filter_map(|_| fetch(ca, url)).collect()
}

/// The current sessions of the lab's HAProxy frontends (`show stat` on its stats socket).
fn sessions_in_flight(lab: &TestLab) -> u64 {
    let mut stream =
        std::os::unix::net::UnixStream::connect(lab.state.path().join("haproxy/stats.sock"))
            .unwrap();
    stream.write_all(b"show stat\n").unwrap();
    let mut stats = String::new();
    stream.read_to_string(&mut stats).unwrap();
    let mut lines = stats.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap()
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let (sv, scur) = (
        header.iter().position(|c| *c == "svname").unwrap(),
        header.iter().position(|c| *c == "scur").unwrap(),
    );
    lines
        .map(|line| line.split(',').collect::<Vec<_>>())
        .filter(|fields| fields.get(sv) == Some(&"FRONTEND"))
        .filter_map(|fields| fields.get(scur)?.parse::<u64>().ok())
        .sum()
}

/// What every test here starts from: a lab, two machines serving, an IAM certificate.
struct Fixture {
    lab: TestLab,
    started: Started,
    ca: PathBuf,
    keys: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    clients: rigger_aws::Clients,
    ids: Vec<String>,
    certificate_arn: String,
    subnet: String,
}

impl Fixture {
    fn new() -> Fixture {
        let (lab, started) = start_lab();
        let ca = lab.state.path().join("pki/ca.crt");
        let keys = tempfile::tempdir().unwrap();
        let (_, public_key) = make_key(keys.path());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let clients = connect(&runtime, &started.endpoint);
        let (ids, subnet) = runtime.block_on(async {
            import_key(&clients, "lab-balancer", &public_key).await;
            let subnet = default_subnet(&clients).await;
            let launched = clients
                .ec2
                .run_instances()
                .image_id(&started.ami)
                .instance_type(ec2::types::InstanceType::T3Micro)
                .min_count(2)
                .max_count(2)
                .key_name("lab-balancer")
                .subnet_id(&subnet)
                .user_data(base64::engine::general_purpose::STANDARD.encode(USER_DATA))
                .send()
                .await
                .expect("RunInstances");
            let ids: Vec<String> = launched
                .instances()
                .iter()
                .map(|i| i.instance_id().unwrap().to_owned())
                .collect();
            (ids, subnet)
        });
        // The load balancer's certificate, uploaded to IAM as rigger's operator would.
        let certificate_arn = upload_self_signed_certificate(
            &runtime,
            &clients,
            keys.path(),
            "lab-balancer",
            "lab-balancer.example.com",
        );
        Fixture {
            lab,
            started,
            ca,
            keys,
            runtime,
            clients,
            ids,
            certificate_arn,
            subnet,
        }
    }

    /// SSH to instance `id`, trusting the host key on its machine's disk.
    fn ssh(&self, id: &str) -> Ssh {
        let status = self.lab.status();
        let address = machine(&status, id).unwrap()["address"]
            .as_str()
            .unwrap()
            .to_owned();
        let host_key = std::fs::read_to_string(
            self.lab
                .state
                .path()
                .join("machines")
                .join(id)
                .join("upper/etc/ssh/ssh_host_ed25519_key.pub"),
        )
        .unwrap();
        Ssh::when_up(
            &self.started.namespace,
            address,
            self.keys.path(),
            id,
            &host_key,
        )
    }

    /// `rigger lab down`, and nothing of the lab (HAProxy included) is left.
    fn down(self) {
        let down = self.lab.rigger(&["down"]);
        assert!(down.status.success(), "rigger lab down: {}", text(&down));
        assert_nothing_left(&self.lab, &self.started);
        let state = self.lab.state.path().display().to_string();
        let haproxies: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
            .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
            .filter(|cmdline| cmdline.contains("haproxy") && cmdline.contains(&state))
            .collect();
        assert!(haproxies.is_empty(), "HAProxy left: {haproxies:?}");
    }
}

/// Each instance's DescribeInstanceHealth state: (id, state, reason code).
fn instance_health(
    runtime: &tokio::runtime::Runtime,
    clients: &rigger_aws::Clients,
) -> Vec<(String, String, String)> {
    let answer = runtime
        .block_on(
            clients
                .elb
                .describe_instance_health()
                .load_balancer_name(LB)
                .send(),
        )
        .expect("DescribeInstanceHealth");
    answer
        .instance_states()
        .iter()
        .map(|s| {
            (
                s.instance_id().unwrap_or_default().to_owned(),
                s.state().unwrap_or_default().to_owned(),
                s.reason_code().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn balancers(lab: &TestLab) -> Vec<serde_json::Value> {
    lab.status()["load_balancers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
#[ignore = "end to end: scripts/test runs it after the other tests (-- --ignored)"]
fn the_labs_load_balancer_is_haproxy_with_real_health() {
    let fixture = Fixture::new();
    let Fixture {
        lab,
        ca,
        runtime,
        clients,
        ids,
        certificate_arn,
        ..
    } = &fixture;
    runtime.block_on(async {
        let listener = |port: i32, protocol: &str| {
            let builder = elb::types::Listener::builder()
                .load_balancer_port(port)
                .protocol(protocol)
                .instance_port(port)
                .instance_protocol(protocol);
            if protocol == "HTTPS" {
                builder.ssl_certificate_id(certificate_arn.as_str())
            } else {
                builder
            }
            .build()
            .unwrap()
        };
        clients
            .elb
            .create_load_balancer()
            .load_balancer_name(LB)
            .listeners(listener(80, "HTTP"))
            .listeners(listener(443, "HTTPS"))
            .availability_zones("us-east-1a")
            .send()
            .await
            .expect("CreateLoadBalancer");
        clients
            .elb
            .configure_health_check()
            .load_balancer_name(LB)
            .health_check(
                elb::types::HealthCheck::builder()
                    .target("HTTPS:443/healthcheck.html")
                    .interval(INTERVAL)
                    .timeout(1)
                    .healthy_threshold(2)
                    .unhealthy_threshold(UNHEALTHY)
                    .build()
                    .unwrap(),
            )
            .send()
            .await
            .expect("ConfigureHealthCheck");
        let mut register = clients
            .elb
            .register_instances_with_load_balancer()
            .load_balancer_name(LB);
        for id in ids {
            register = register.instances(elb::types::Instance::builder().instance_id(id).build());
        }
        register
            .send()
            .await
            .expect("RegisterInstancesWithLoadBalancer");
    });

    // Both machines in service, as HAProxy sees them and DescribeInstanceHealth says.
    let started_at = Instant::now();
    wait_for("both instances InService", Duration::from_secs(180), || {
        let health = instance_health(runtime, clients);
        (health.len() == 2 && health.iter().all(|h| h.1 == "InService")).then_some(())
    });
    eprintln!(
        "launch -> both InService: {:.1} s",
        started_at.elapsed().as_secs_f64()
    );
    // `rigger lab status` follows within a second or so (the runner reports once a round).
    let wanted: BTreeSet<(String, String)> = ids
        .iter()
        .map(|id| (id.clone(), "in_service".to_owned()))
        .collect();
    let listed = wait_for(
        "both in service in the lab's status",
        Duration::from_secs(10),
        || {
            let listed = balancers(lab);
            let states: BTreeSet<(String, String)> = listed.first()?["backends"]
                .as_array()?
                .iter()
                .map(|b| {
                    (
                        b["instance_id"].as_str().unwrap().to_owned(),
                        b["state"].as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            (states == wanted).then_some(listed)
        },
    );
    assert_eq!(listed.len(), 1, "{listed:#?}");
    let address = listed[0]["address"].as_str().unwrap().to_owned();
    assert_eq!(listed[0]["url"], format!("https://{address}/"));
    assert!(
        address.starts_with("127.31.") && address.ends_with(".10"),
        "{address}"
    );
    for backend in listed[0]["backends"].as_array().unwrap() {
        assert!(
            backend["address"].as_str().unwrap().starts_with("172.31."),
            "{backend}"
        );
    }
    // DescribeLoadBalancers names it by the address this machine reaches it at.
    let dns_name = runtime
        .block_on(clients.elb.describe_load_balancers().send())
        .expect("DescribeLoadBalancers")
        .load_balancer_descriptions()[0]
        .dns_name()
        .unwrap()
        .to_owned();
    assert_eq!(dns_name, address);
    let human = lab.rigger(&["status"]);
    assert!(
        text(&human).contains(&format!("{LB}  https://{address}/")),
        "{}",
        text(&human)
    );

    // HTTPS through the load balancer (its certificate is the lab CA's) reaches both.
    let answered = answering(ca, &format!("https://{address}/"));
    assert_eq!(answered, ids.iter().cloned().collect());

    // Stop one server: out of service within its thresholds, every request to the other.
    let (failing, other) = (&ids[0], &ids[1]);
    let ssh = fixture.ssh(failing);
    ssh.ok("sudo systemctl stop lab-web");
    let stopped = Instant::now();
    let reason = wait_for(
        "the stopped one OutOfService",
        Duration::from_secs(30),
        || {
            instance_health(runtime, clients)
                .into_iter()
                .find(|h| &h.0 == failing && h.1 == "OutOfService")
                .map(|h| h.2)
        },
    );
    let took = stopped.elapsed();
    eprintln!(
        "server stopped -> OutOfService: {:.2} s (interval {INTERVAL} s, unhealthy threshold {UNHEALTHY})",
        took.as_secs_f64()
    );
    assert_eq!(reason, "Instance");
    assert!(
        took < Duration::from_secs((INTERVAL * (UNHEALTHY + 1) + 2) as u64),
        "{took:?}"
    );
    let health = instance_health(runtime, clients);
    assert!(
        health.iter().any(|h| &h.0 == other && h.1 == "InService"),
        "{health:?}"
    );
    for _ in 0..20 {
        assert_eq!(get(ca, &address).as_deref(), Some(other.as_str()));
    }

    // Back: in service after the healthy threshold of checks, and answering again.
    ssh.ok(START_AGAIN);
    let restarted = Instant::now();
    wait_for(
        "the restarted one InService",
        Duration::from_secs(30),
        || {
            instance_health(runtime, clients)
                .into_iter()
                .any(|h| &h.0 == failing && h.1 == "InService")
                .then_some(())
        },
    );
    eprintln!(
        "server back -> InService: {:.2} s (healthy threshold 2)",
        restarted.elapsed().as_secs_f64()
    );
    assert_eq!(
        answering(ca, &format!("https://{address}/")),
        ids.iter().cloned().collect()
    );

    // Deregistered: gone from HAProxy.
    runtime
        .block_on(
            clients
                .elb
                .deregister_instances_from_load_balancer()
                .load_balancer_name(LB)
                .instances(
                    elb::types::Instance::builder()
                        .instance_id(failing.as_str())
                        .build(),
                )
                .send(),
        )
        .expect("DeregisterInstancesFromLoadBalancer");
    let config = lab.state.path().join("haproxy/haproxy.cfg");
    wait_for(
        "the deregistered instance out of HAProxy",
        Duration::from_secs(10),
        || {
            let listed = balancers(lab);
            let backends = listed.first()?["backends"].as_array()?.clone();
            (backends.len() == 1
                && backends[0]["instance_id"] == other.as_str()
                && !std::fs::read_to_string(&config)
                    .ok()?
                    .contains(failing.as_str()))
            .then_some(())
        },
    );
    assert_eq!(get(ca, &address).as_deref(), Some(other.as_str()));

    // Deleted: its frontend is gone.
    runtime
        .block_on(
            clients
                .elb
                .delete_load_balancer()
                .load_balancer_name(LB)
                .send(),
        )
        .expect("DeleteLoadBalancer");
    wait_for(
        "the deleted load balancer's frontend gone",
        Duration::from_secs(10),
        || {
            (balancers(lab).is_empty()
                && std::net::TcpStream::connect((address.as_str(), 443)).is_err())
            .then_some(())
        },
    );

    fixture.down();
}

/// Each target's DescribeTargetHealth state in target group `arn`: (id, port, state, reason).
fn target_health(
    runtime: &tokio::runtime::Runtime,
    clients: &rigger_aws::Clients,
    arn: &str,
) -> Vec<(String, i32, String, String)> {
    let answer = runtime
        .block_on(
            clients
                .elbv2
                .describe_target_health()
                .target_group_arn(arn)
                .send(),
        )
        .expect("DescribeTargetHealth");
    answer
        .target_health_descriptions()
        .iter()
        .map(|d| {
            let health = d.target_health();
            (
                d.target()
                    .and_then(|t| t.id())
                    .unwrap_or_default()
                    .to_owned(),
                d.target().and_then(|t| t.port()).unwrap_or_default(),
                health
                    .and_then(|h| h.state())
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_default(),
                health
                    .and_then(|h| h.reason())
                    .map(|r| r.as_str().to_owned())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

/// The state of `id` in target group `arn`, with its reason.
fn target_state(
    runtime: &tokio::runtime::Runtime,
    clients: &rigger_aws::Clients,
    arn: &str,
    id: &str,
) -> Option<(String, String)> {
    target_health(runtime, clients, arn)
        .into_iter()
        .find(|t| t.0 == id)
        .map(|t| (t.2, t.3))
}

#[test]
#[ignore = "end to end: scripts/test runs it after the other tests (-- --ignored)"]
fn the_labs_application_load_balancer_is_haproxy_with_real_target_health() {
    use elbv2::types::{
        Action, ActionTypeEnum, Certificate, LoadBalancerTypeEnum, ProtocolEnum, TargetDescription,
        TargetGroupAttribute,
    };
    let fixture = Fixture::new();
    let Fixture {
        lab,
        ca,
        runtime,
        clients,
        ids,
        certificate_arn,
        subnet,
        ..
    } = &fixture;

    // As rigger makes one: a target group per listener (HTTPS 443, HTTP 80), both checking
    // HTTPS:443/healthcheck.html; the HTTPS listener with the IAM certificate.
    let (https_group, http_group, alb_arn) = runtime.block_on(async {
        let vpc = clients
            .ec2
            .describe_subnets()
            .subnet_ids(subnet)
            .send()
            .await
            .expect("DescribeSubnets")
            .subnets()[0]
            .vpc_id()
            .unwrap()
            .to_owned();
        let mut groups = Vec::new();
        for (port, protocol) in [(443, ProtocolEnum::Https), (80, ProtocolEnum::Http)] {
            let created = clients
                .elbv2
                .create_target_group()
                .name(format!("{ALB}-{port}"))
                .protocol(protocol)
                .port(port)
                .vpc_id(&vpc)
                .health_check_protocol(ProtocolEnum::Https)
                .health_check_port("443")
                .health_check_path("/healthcheck.html")
                .health_check_interval_seconds(INTERVAL)
                .health_check_timeout_seconds(1)
                .healthy_threshold_count(2)
                .unhealthy_threshold_count(UNHEALTHY)
                .send()
                .await
                .expect("CreateTargetGroup");
            let arn = created.target_groups()[0]
                .target_group_arn()
                .unwrap()
                .to_owned();
            clients
                .elbv2
                .modify_target_group_attributes()
                .target_group_arn(&arn)
                .attributes(
                    TargetGroupAttribute::builder()
                        .key("deregistration_delay.timeout_seconds")
                        .value("30")
                        .build(),
                )
                .send()
                .await
                .expect("ModifyTargetGroupAttributes");
            let mut register = clients.elbv2.register_targets().target_group_arn(&arn);
            for id in ids {
                register = register.targets(TargetDescription::builder().id(id).build());
            }
            register.send().await.expect("RegisterTargets");
            groups.push(arn);
        }
        let alb = clients
            .elbv2
            .create_load_balancer()
            .name(ALB)
            .r#type(LoadBalancerTypeEnum::Application)
            .subnets(subnet)
            .send()
            .await
            .expect("CreateLoadBalancer")
            .load_balancers()[0]
            .load_balancer_arn()
            .unwrap()
            .to_owned();
        for (port, protocol, group) in [
            (443, ProtocolEnum::Https, &groups[0]),
            (80, ProtocolEnum::Http, &groups[1]),
        ] {
            let mut listener = clients
                .elbv2
                .create_listener()
                .load_balancer_arn(&alb)
                .port(port)
                .protocol(protocol.clone())
                .default_actions(
                    Action::builder()
                        .r#type(ActionTypeEnum::Forward)
                        .target_group_arn(group)
                        .build(),
                );
            if protocol == ProtocolEnum::Https {
                listener = listener.certificates(
                    Certificate::builder()
                        .certificate_arn(certificate_arn)
                        .build(),
                );
            }
            listener.send().await.expect("CreateListener");
        }
        (groups[0].clone(), groups[1].clone(), alb)
    });

    // Healthy in both groups, as HAProxy sees them and DescribeTargetHealth says.
    let started_at = Instant::now();
    for group in [&https_group, &http_group] {
        wait_for("both targets healthy", Duration::from_secs(180), || {
            let health = target_health(runtime, clients, group);
            (health.len() == 2 && health.iter().all(|t| t.2 == "healthy")).then_some(())
        });
    }
    eprintln!(
        "launch -> both healthy: {:.1} s",
        started_at.elapsed().as_secs_f64()
    );
    let listed = wait_for(
        "both in service in both groups in the lab's status",
        Duration::from_secs(10),
        || {
            let listed = balancers(lab);
            let backends = listed.first()?["backends"].as_array()?.clone();
            (backends.len() == 4 && backends.iter().all(|b| b["state"] == "in_service"))
                .then_some(listed)
        },
    );
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(listed[0]["kind"], "application");
    let address = listed[0]["address"].as_str().unwrap().to_owned();
    assert_eq!(listed[0]["url"], format!("https://{address}/"));
    let groups: BTreeSet<&str> = listed[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["target_group"].as_str().unwrap())
        .collect();
    assert_eq!(
        groups,
        [format!("{ALB}-443"), format!("{ALB}-80")]
            .iter()
            .map(String::as_str)
            .collect()
    );
    // DescribeLoadBalancers (v2) names it by the address this machine reaches it at.
    let dns_name = runtime
        .block_on(clients.elbv2.describe_load_balancers().send())
        .expect("DescribeLoadBalancers")
        .load_balancers()[0]
        .dns_name()
        .unwrap()
        .to_owned();
    assert_eq!(dns_name, address);

    // Both listeners reach both machines.
    let everyone: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(answering(ca, &format!("https://{address}/")), everyone);
    assert_eq!(answering(ca, &format!("http://{address}/")), everyone);

    // A request in flight survives a reload (a new listener).
    let slow = {
        let (ca, url) = (ca.clone(), format!("https://{address}/slow"));
        std::thread::spawn(move || fetch(&ca, &url))
    };
    wait_for(
        "the slow request in flight",
        Duration::from_secs(10),
        || (sessions_in_flight(lab) > 0).then_some(()),
    );
    runtime
        .block_on(
            clients
                .elbv2
                .create_listener()
                .load_balancer_arn(&alb_arn)
                .port(8080)
                .protocol(ProtocolEnum::Http)
                .default_actions(
                    Action::builder()
                        .r#type(ActionTypeEnum::Forward)
                        .target_group_arn(&http_group)
                        .build(),
                )
                .send(),
        )
        .expect("CreateListener");
    wait_for(
        "the new listener answering",
        Duration::from_secs(10),
        || fetch(ca, &format!("http://{address}:8080/")),
    );
    let answer = slow.join().unwrap();
    assert!(
        answer.as_ref().is_some_and(|id| everyone.contains(id)),
        "the request in flight during the reload: {answer:?}"
    );

    // Stop one server: unhealthy within its thresholds, every request to the other.
    let (failing, other) = (&ids[0], &ids[1]);
    let ssh = fixture.ssh(failing);
    ssh.ok("sudo systemctl stop lab-web");
    let stopped = Instant::now();
    let reason = wait_for("the stopped one unhealthy", Duration::from_secs(30), || {
        target_state(runtime, clients, &https_group, failing)
            .filter(|(state, _)| state == "unhealthy")
            .map(|(_, reason)| reason)
    });
    let took = stopped.elapsed();
    eprintln!(
        "server stopped -> unhealthy: {:.2} s (interval {INTERVAL} s, unhealthy threshold {UNHEALTHY})",
        took.as_secs_f64()
    );
    assert_eq!(reason, "Target.FailedHealthChecks");
    assert!(
        took < Duration::from_secs((INTERVAL * (UNHEALTHY + 1) + 2) as u64),
        "{took:?}"
    );
    assert_eq!(
        target_state(runtime, clients, &https_group, other),
        Some(("healthy".to_owned(), String::new()))
    );
    for _ in 0..20 {
        assert_eq!(get(ca, &address).as_deref(), Some(other.as_str()));
    }

    // Back: healthy after the healthy threshold of checks, and answering again.
    ssh.ok(START_AGAIN);
    let restarted = Instant::now();
    wait_for("the restarted one healthy", Duration::from_secs(30), || {
        (target_state(runtime, clients, &https_group, failing)?.0 == "healthy").then_some(())
    });
    eprintln!(
        "server back -> healthy: {:.2} s (healthy threshold 2)",
        restarted.elapsed().as_secs_f64()
    );
    assert_eq!(answering(ca, &format!("https://{address}/")), everyone);

    // Deregistered with requests in flight: draining (no new requests) until they end.
    let in_flight: Vec<_> = (0..4)
        .map(|_| {
            let (ca, url) = (ca.clone(), format!("https://{address}/slow"));
            std::thread::spawn(move || fetch(&ca, &url))
        })
        .collect();
    wait_for(
        "the slow requests in flight",
        Duration::from_secs(10),
        || (sessions_in_flight(lab) >= 4).then_some(()),
    );
    runtime
        .block_on(
            clients
                .elbv2
                .deregister_targets()
                .target_group_arn(&https_group)
                .targets(TargetDescription::builder().id(failing.as_str()).build())
                .send(),
        )
        .expect("DeregisterTargets");
    let reason = wait_for(
        "the deregistered one draining",
        Duration::from_secs(5),
        || {
            target_state(runtime, clients, &https_group, failing)
                .filter(|(state, _)| state == "draining")
                .map(|(_, reason)| reason)
        },
    );
    assert_eq!(reason, "Target.DeregistrationInProgress");
    assert_eq!(
        fetch_or_why(ca, &format!("https://{address}/")),
        Ok(other.clone()),
        "a new request while the other drains"
    );
    let answers: Vec<Option<String>> = in_flight.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        answers
            .iter()
            .any(|a| a.as_deref() == Some(failing.as_str()))
            && answers.iter().all(|a| a.is_some()),
        "every request in flight answered, some by the drained one: {answers:?}"
    );
    wait_for("the drained one gone", Duration::from_secs(10), || {
        let health = target_health(runtime, clients, &https_group);
        (health.len() == 1 && &health[0].0 == other).then_some(())
    });

    // Deleted: its frontends are gone, its target groups are not in use.
    runtime
        .block_on(
            clients
                .elbv2
                .delete_load_balancer()
                .load_balancer_arn(&alb_arn)
                .send(),
        )
        .expect("DeleteLoadBalancer");
    wait_for(
        "the deleted load balancer's frontends gone",
        Duration::from_secs(10),
        || {
            (balancers(lab).is_empty()
                && std::net::TcpStream::connect((address.as_str(), 443)).is_err())
            .then_some(())
        },
    );
    assert_eq!(
        target_state(runtime, clients, &http_group, other),
        Some(("unused".to_owned(), "Target.NotInUse".to_owned()))
    );
    assert!(
        !lab.state
            .path()
            .join("haproxy/alb-lab-balancer-alb.pem")
            .exists(),
        "the deleted load balancer's certificate and key are removed"
    );
    fixture.down();
}
