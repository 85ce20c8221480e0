//! What the lab's end-to-end tests share: a lab of the test's own (`rigger lab up` in a
//! temporary state directory, taken down when dropped), SSH to its machines, the emulator's
//! clients, waiting on conditions, and the check that `rigger lab down` left nothing.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rigger_aws::lab::sdk::ec2;
use rigger_aws::{Clients, Connection};

pub const REGION: &str = "us-east-1";

/// A lab of this test's own (its own state directory, the shared image cache), taken down
/// when dropped, whatever happened.
pub struct TestLab {
    pub state: tempfile::TempDir,
    pub images: PathBuf,
}

impl TestLab {
    /// A lab in a new state directory whose loopback block (`127.31.N.0`, derived from the
    /// directory) no other lab of this test binary holds: tests run in parallel, and two labs
    /// of one block would both listen on its bastion's address (1 chance in 254 per pair).
    pub fn new(images: PathBuf) -> TestLab {
        static BLOCKS_IN_USE: std::sync::Mutex<Vec<std::net::Ipv4Addr>> =
            std::sync::Mutex::new(Vec::new());
        let mut in_use = BLOCKS_IN_USE.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let state = tempfile::Builder::new()
                .prefix("rigger-lab-test-")
                .tempdir_in("/var/tmp")
                .unwrap();
            let block = rigger_lab::layout::Lab::new(state.path(), &images)
                .expect("a lab layout")
                .loopback_address(0);
            if !in_use.contains(&block) {
                in_use.push(block);
                return TestLab { state, images };
            }
        }
    }

    pub fn rigger(&self, args: &[&str]) -> Output {
        crate::hermetic::rigger_binary()
            .arg("lab")
            .arg("--dir")
            .arg(self.state.path())
            .arg("--images")
            .arg(&self.images)
            .args(args)
            .output()
            .expect("running rigger")
    }

    pub fn status(&self) -> serde_json::Value {
        let output = self.rigger(&["status", "--json"]);
        assert!(
            output.status.success(),
            "rigger lab status: {}",
            text(&output)
        );
        serde_json::from_slice(&output.stdout).expect("status JSON")
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = self.rigger(&["down"]);
    }
}

pub fn text(output: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Polls `check` every 100 ms until it gives a value, failing after `limit` with `what`.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            started.elapsed() < limit,
            "{what}: not after {} s",
            limit.as_secs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn machine<'a>(
    status: &'a serde_json::Value,
    instance_id: &str,
) -> Option<&'a serde_json::Value> {
    status["machines"]
        .as_array()?
        .iter()
        .find(|m| m["instance_id"] == instance_id)
}

/// SSH as the image's default user, from the lab's namespace, trusting only the host key
/// read from the machine's own disk.
pub struct Ssh {
    pub namespace: String,
    pub address: String,
    pub key: PathBuf,
    pub known_hosts: PathBuf,
}

impl Ssh {
    /// SSH to machine `id` at `address` with the key `keys/id_ed25519` (from [`make_key`]),
    /// trusting only `host_key` (read from the machine's disk), once it answers.
    pub fn when_up(namespace: &str, address: String, keys: &Path, id: &str, host_key: &str) -> Ssh {
        let known_hosts = keys.join(format!("known_hosts-{id}"));
        std::fs::write(&known_hosts, format!("{address} {host_key}")).unwrap();
        let ssh = Ssh {
            namespace: namespace.to_owned(),
            address,
            key: keys.join("id_ed25519"),
            known_hosts,
        };
        wait_for("SSH to the machine", Duration::from_secs(60), || {
            ssh.run("true").status.success().then_some(())
        });
        ssh
    }

    pub fn run(&self, command: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.namespace, "ssh"])
            .arg("-i")
            .arg(&self.key)
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args([
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=2",
                "-o",
                "LogLevel=ERROR",
            ])
            .arg(format!("admin@{}", self.address))
            .arg(command)
            .output()
            .expect("running ssh")
    }

    pub fn ok(&self, command: &str) -> String {
        let output = self.run(command);
        assert!(output.status.success(), "ssh {command}: {}", text(&output));
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

pub fn is_running(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit(") ")
            .next()
            .and_then(|rest| rest.chars().next());
        !matches!(state, Some('Z' | 'X'))
    })
}

/// A lab of this test's own, up; fails (never skips) when the machine cannot run one.
pub fn start_lab() -> (TestLab, Started) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the lab needs root (network namespaces, mounts, systemd-nspawn): run the tests as root (scripts/test)"
    );
    let images = std::env::var_os("RIGGER_LAB_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(rigger_lab::layout::DEFAULT_IMAGES_DIR));
    for flavor in rigger_lab::image::Flavor::ALL {
        assert!(
            rigger_lab::image::find(&images, flavor).is_some(),
            "no {flavor} lab image in {} for this rigger: build the lab's images with `rigger lab image` (scripts/test does, before the tests)",
            images.display()
        );
    }
    let lab = TestLab::new(images);
    let up = lab.rigger(&["up", "--emulator", &emulator()]);
    assert!(up.status.success(), "rigger lab up: {}", text(&up));
    let status = lab.status();
    assert_eq!(status["state"], "up", "{status:#}");
    let started = Started {
        endpoint: status["endpoint"].as_str().unwrap().to_owned(),
        ami: status["ami"].as_str().unwrap().to_owned(),
        stock_ami: status["amis"]["stock"].as_str().unwrap().to_owned(),
        namespace: status["namespace"].as_str().unwrap().to_owned(),
        emulator_pid: status["emulator_pid"].as_i64().unwrap(),
        runner_pid: status["runner_pid"].as_i64().unwrap(),
    };
    assert!(
        started.endpoint.starts_with("http://127.0.0.1:"),
        "{}",
        started.endpoint
    );
    assert!(started.ami.starts_with("ami-"), "{}", started.ami);
    assert_eq!(status["amis"]["baked"], status["ami"], "{status:#}");
    assert!(
        started.stock_ami.starts_with("ami-") && started.stock_ami != started.ami,
        "{status:#}"
    );
    (lab, started)
}

/// What `rigger lab status --json` said once the lab was up.
pub struct Started {
    pub endpoint: String,
    /// The baked lab image's AMI (every role's packages).
    pub ami: String,
    /// The stock lab image's AMI (Debian's EC2 AMI as it is).
    pub stock_ami: String,
    pub namespace: String,
    pub emulator_pid: i64,
    pub runner_pid: i64,
}

/// moto's server, installed by scripts/moto.sh if needed.
pub fn emulator() -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let installed = Command::new(root.join("scripts/moto.sh"))
        .output()
        .expect("running scripts/moto.sh");
    assert!(
        installed.status.success(),
        "scripts/moto.sh: {}",
        text(&installed)
    );
    String::from_utf8(installed.stdout)
        .unwrap()
        .trim()
        .to_owned()
}

/// The SDK's clients against the lab's emulator, retries off.
pub fn connect(runtime: &tokio::runtime::Runtime, endpoint: &str) -> Clients {
    runtime.block_on(Clients::connect(&Connection {
        region: REGION.into(),
        endpoint_url: Some(endpoint.to_owned()),
        max_attempts: Some(1),
        static_credentials: Some(("testing".into(), "testing".into())),
    }))
}

/// A default subnet of the default VPC (moto gives an instance launched without one an
/// address outside every VPC).
pub async fn default_subnet(clients: &Clients) -> String {
    let subnets = clients
        .ec2
        .describe_subnets()
        .filters(
            ec2::types::Filter::builder()
                .name("default-for-az")
                .values("true")
                .build(),
        )
        .filters(
            ec2::types::Filter::builder()
                .name("availability-zone")
                .values("us-east-1a")
                .build(),
        )
        .send()
        .await
        .expect("DescribeSubnets");
    subnets.subnets()[0].subnet_id().unwrap().to_owned()
}

/// Asserts that nothing of the lab is left: namespaces, mounts, cgroups, its processes.
pub fn assert_nothing_left(lab: &TestLab, started: &Started) {
    let lab_namespaces: Vec<String> = namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&started.namespace))
        .collect();
    assert!(
        lab_namespaces.is_empty(),
        "namespaces left: {lab_namespaces:?}"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let state = lab.state.path().display().to_string();
    assert!(
        !mounts.contains(&state),
        "mounts left under {state}:\n{mounts}"
    );
    for hierarchy in ["systemd", "unified", ""] {
        let cgroup = Path::new("/sys/fs/cgroup")
            .join(hierarchy)
            .join(&started.namespace);
        assert!(!cgroup.exists(), "cgroup left: {}", cgroup.display());
    }
    assert!(!is_running(started.emulator_pid), "the emulator still runs");
    assert!(!is_running(started.runner_pid), "the runner still runs");
    let nspawns: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| cmdline.contains("systemd-nspawn") && cmdline.contains(&state))
        .collect();
    assert!(nspawns.is_empty(), "machines left: {nspawns:?}");
    let after = lab.status();
    assert_eq!(after["state"], "down", "{after:#}");
}

pub fn namespaces() -> Vec<String> {
    let output = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// An ed25519 key made with ssh-keygen in `dir`: the private key's path and the public key.
pub fn make_key(dir: &Path) -> (PathBuf, String) {
    let key = dir.join("id_ed25519");
    let generated = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        generated.status.success(),
        "ssh-keygen: {}",
        text(&generated)
    );
    let public_key = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    (key, public_key)
}

/// Imports `public_key` into the emulator as key pair `name`.
pub async fn import_key(clients: &Clients, name: &str, public_key: &str) {
    clients
        .ec2
        .import_key_pair()
        .key_name(name)
        .public_key_material(ec2::primitives::Blob::new(public_key.as_bytes()))
        .send()
        .await
        .expect("ImportKeyPair");
}

/// Makes role `role` (for EC2) and instance profile `profile` holding it.
pub async fn make_instance_profile(clients: &Clients, role: &str, profile: &str) {
    clients
        .iam
        .create_role()
        .role_name(role)
        .assume_role_policy_document(
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#,
        )
        .send()
        .await
        .expect("CreateRole");
    clients
        .iam
        .create_instance_profile()
        .instance_profile_name(profile)
        .send()
        .await
        .expect("CreateInstanceProfile");
    clients
        .iam
        .add_role_to_instance_profile()
        .instance_profile_name(profile)
        .role_name(role)
        .send()
        .await
        .expect("AddRoleToInstanceProfile");
}

/// Makes a self-signed certificate for `domain` (`dir/lb.crt`, key `dir/lb.key`) and uploads
/// it as IAM server certificate `name`, as an operator does for the load balancer; its ARN.
pub fn upload_self_signed_certificate(
    runtime: &tokio::runtime::Runtime,
    clients: &Clients,
    dir: &Path,
    name: &str,
    domain: &str,
) -> String {
    let (certificate, key) = (dir.join("lb.crt"), dir.join("lb.key"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
        ])
        .args(["-subj", &format!("/CN={domain}"), "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&certificate)
        .output()
        .unwrap();
    assert!(made.status.success(), "openssl: {}", text(&made));
    runtime.block_on(async {
        clients
            .iam
            .upload_server_certificate()
            .server_certificate_name(name)
            .certificate_body(std::fs::read_to_string(&certificate).unwrap())
            .private_key(std::fs::read_to_string(&key).unwrap())
            .send()
            .await
            .expect("UploadServerCertificate")
            .server_certificate_metadata()
            .expect("metadata")
            .arn()
            .to_owned()
    })
}
