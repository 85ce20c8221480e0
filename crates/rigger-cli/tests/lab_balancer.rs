//! The lab's load balancers end to end, through the real `rigger` binary: two machines whose
//! user-data serves HTTPS on 443 (and HTTP on 80) with `/healthcheck.html`, behind a classic
//! load balancer created through the lab's endpoint with rigger's listeners (80->80, 443->443
//! with an uploaded IAM certificate) and health check (HTTPS:443/healthcheck.html). HTTPS to
//! the load balancer's loopback address (the one DescribeLoadBalancers names, the certificate
//! of the lab's CA for it) reaches both; DescribeInstanceHealth is HAProxy's view: both in
//! service, then the one whose server is stopped goes out of service within its thresholds
//! (measured) and every request goes to the other; a deregistered instance leaves HAProxy; a
//! deleted load balancer's frontend is gone; `rigger lab down` leaves nothing.
//!
//! Needs root, the lab image (`rigger lab image`) and moto (scripts/moto.sh); fails, never
//! skips, when one is missing.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rigger_aws::lab::sdk::{ec2, elb};

mod lab_support;
use lab_support::*;

const LB: &str = "lab-balancer-lb";
const INTERVAL: i32 = 2;
const UNHEALTHY: i32 = 2;

/// Serves its instance id on `/` (HTTP on 80, HTTPS on 443 with a self-signed certificate)
/// and `ok` on `/healthcheck.html`, as the `lab-web` unit (so a test can stop it).
const USER_DATA: &str = r#"#!/bin/bash
set -e
install -d /srv/lab
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=lab-web \
  -keyout /srv/lab/key.pem -out /srv/lab/cert.pem 2>/dev/null
cat >/srv/lab/serve.py <<'EOF'
import http.server, ssl, threading, urllib.request

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

/// `GET /` over HTTPS at `address`, verifying the load balancer's certificate with the lab's
/// CA; the body, or `None` when it did not answer 200.
fn get(ca: &Path, address: &str) -> Option<String> {
    let output = Command::new("curl")
        .args(["-s", "--max-time", "5", "-w", "\n%{http_code}", "--cacert"])
        .arg(ca)
        .arg(format!("https://{address}/"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    (code == "200").then(|| body.trim().to_owned())
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
fn the_labs_load_balancer_is_haproxy_with_real_health() {
    let (lab, started) = start_lab();
    let Started {
        endpoint,
        ami,
        namespace,
        ..
    } = &started;
    let ca = lab.state.path().join("pki/ca.crt");

    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("id_ed25519");
    let generated = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(generated.status.success(), "{}", text(&generated));
    let public_key = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    // The load balancer's certificate, uploaded to IAM as rigger's operator would.
    let (certificate, private_key) = (keys.path().join("lb.crt"), keys.path().join("lb.key"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=lab-balancer.example.com", "-keyout"])
        .arg(&private_key)
        .arg("-out")
        .arg(&certificate)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made));

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let clients = connect(&runtime, endpoint);
    let ids: Vec<String> = runtime.block_on(async {
        clients
            .ec2
            .import_key_pair()
            .key_name("lab-balancer")
            .public_key_material(ec2::primitives::Blob::new(public_key.as_bytes()))
            .send()
            .await
            .expect("ImportKeyPair");
        let subnet = default_subnet(&clients).await;
        let launched = clients
            .ec2
            .run_instances()
            .image_id(ami)
            .instance_type(ec2::types::InstanceType::T3Micro)
            .min_count(2)
            .max_count(2)
            .key_name("lab-balancer")
            .subnet_id(subnet)
            .user_data(base64::engine::general_purpose::STANDARD.encode(USER_DATA))
            .send()
            .await
            .expect("RunInstances");
        launched
            .instances()
            .iter()
            .map(|i| i.instance_id().unwrap().to_owned())
            .collect()
    });
    let certificate_arn = runtime.block_on(async {
        clients
            .iam
            .upload_server_certificate()
            .server_certificate_name("lab-balancer")
            .certificate_body(std::fs::read_to_string(&certificate).unwrap())
            .private_key(std::fs::read_to_string(&private_key).unwrap())
            .send()
            .await
            .expect("UploadServerCertificate")
            .server_certificate_metadata()
            .expect("metadata")
            .arn()
            .to_owned()
    });
    runtime.block_on(async {
        let listener = |port: i32, protocol: &str| {
            let builder = elb::types::Listener::builder()
                .load_balancer_port(port)
                .protocol(protocol)
                .instance_port(port)
                .instance_protocol(protocol);
            if protocol == "HTTPS" {
                builder.ssl_certificate_id(&certificate_arn)
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
        for id in &ids {
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
        let health = instance_health(&runtime, &clients);
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
            let listed = balancers(&lab);
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
    let answered: BTreeSet<String> = (0..20).filter_map(|_| get(&ca, &address)).collect();
    assert_eq!(answered, ids.iter().cloned().collect());

    // Stop one server: out of service within its thresholds, every request to the other.
    let (failing, other) = (&ids[0], &ids[1]);
    let status = lab.status();
    let failing_address = machine(&status, failing).unwrap()["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let host_key = std::fs::read_to_string(
        lab.state
            .path()
            .join("machines")
            .join(failing)
            .join("upper/etc/ssh/ssh_host_ed25519_key.pub"),
    )
    .unwrap();
    let known_hosts = keys.path().join("known_hosts");
    std::fs::write(&known_hosts, format!("{failing_address} {host_key}")).unwrap();
    let ssh = Ssh {
        namespace: namespace.clone(),
        address: failing_address,
        key,
        known_hosts,
    };
    wait_for("SSH to the machine", Duration::from_secs(60), || {
        ssh.run("true").status.success().then_some(())
    });
    ssh.ok("sudo systemctl stop lab-web");
    let stopped = Instant::now();
    let reason = wait_for(
        "the stopped one OutOfService",
        Duration::from_secs(30),
        || {
            instance_health(&runtime, &clients)
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
    let health = instance_health(&runtime, &clients);
    assert!(
        health.iter().any(|h| &h.0 == other && h.1 == "InService"),
        "{health:?}"
    );
    for _ in 0..20 {
        assert_eq!(get(&ca, &address).as_deref(), Some(other.as_str()));
    }

    // Deregistered: gone from HAProxy.
    runtime
        .block_on(
            clients
                .elb
                .deregister_instances_from_load_balancer()
                .load_balancer_name(LB)
                .instances(elb::types::Instance::builder().instance_id(failing).build())
                .send(),
        )
        .expect("DeregisterInstancesFromLoadBalancer");
    let config = lab.state.path().join("haproxy/haproxy.cfg");
    wait_for(
        "the deregistered instance out of HAProxy",
        Duration::from_secs(10),
        || {
            let listed = balancers(&lab);
            let backends = listed.first()?["backends"].as_array()?.clone();
            (backends.len() == 1
                && backends[0]["instance_id"] == other.as_str()
                && !std::fs::read_to_string(&config)
                    .ok()?
                    .contains(failing.as_str()))
            .then_some(())
        },
    );
    assert_eq!(get(&ca, &address).as_deref(), Some(other.as_str()));

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
            (balancers(&lab).is_empty()
                && std::net::TcpStream::connect((address.as_str(), 443)).is_err())
            .then_some(())
        },
    );

    let down = lab.rigger(&["down"]);
    assert!(down.status.success(), "rigger lab down: {}", text(&down));
    assert_nothing_left(&lab, &started);
    let state = lab.state.path().display().to_string();
    let haproxies: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| cmdline.contains("haproxy") && cmdline.contains(&state))
        .collect();
    assert!(haproxies.is_empty(), "HAProxy left: {haproxies:?}");
}
