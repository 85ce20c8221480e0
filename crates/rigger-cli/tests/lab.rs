//! The AWS lab end to end, through the real `rigger` binary: `rigger lab up`, an instance
//! launched with the SDK from the lab image's AMI boots as a machine that answers SSH at its
//! private address with the key pair's key, runs its user-data exactly once (a stop and start
//! of the instance, a reboot from inside, do not run it again), and is answered by its own
//! metadata service (IMDSv2 only, credentials of its instance profile that the emulator knows
//! as the role's); a poweroff from inside stops the instance; terminating it removes the
//! machine; `rigger lab down` leaves nothing, also after the runner was killed.
//!
//! Needs root, the lab image (`rigger lab image`, which scripts/test runs before the tests)
//! and moto (scripts/moto.sh). When any is missing the test fails, saying which: it never
//! skips.

mod hermetic;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rigger_aws::lab::sdk::{ec2, sts};

mod lab_support;
use lab_support::*;

const ROLE: &str = "lab-test-role";
const PROFILE: &str = "lab-test-profile";

/// The user-data: appends a line each time it runs.
const USER_DATA: &str = "#!/bin/bash\nset -e\ninstall -d /var/lib/lab-test\necho \"ran at $(date +%s.%N)\" >>/var/lib/lab-test/runs\n";

#[test]
#[ignore = "end to end: scripts/test runs it after the other tests (-- --ignored)"]
fn an_instance_boots_as_a_machine_and_down_leaves_nothing() {
    let (lab, started) = start_lab();
    let Started {
        endpoint,
        ami,
        namespace,
        ..
    } = &started;

    let keys = tempfile::tempdir().unwrap();
    let (key, public_key) = make_key(keys.path());

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let clients = connect(&runtime, endpoint);
    let instance_id = runtime.block_on(async {
        import_key(&clients, "lab-test", &public_key).await;
        make_instance_profile(&clients, ROLE, PROFILE).await;
        let subnet = default_subnet(&clients).await;
        let launched = clients
            .ec2
            .run_instances()
            .image_id(ami)
            .instance_type(ec2::types::InstanceType::T3Micro)
            .min_count(1)
            .max_count(1)
            .key_name("lab-test")
            .subnet_id(subnet)
            .user_data(base64::engine::general_purpose::STANDARD.encode(USER_DATA))
            .iam_instance_profile(
                ec2::types::IamInstanceProfileSpecification::builder()
                    .name(PROFILE)
                    .build(),
            )
            .metadata_options(
                ec2::types::InstanceMetadataOptionsRequest::builder()
                    .http_tokens(ec2::types::HttpTokensState::Required)
                    .build(),
            )
            .send()
            .await
            .expect("RunInstances");
        launched.instances()[0].instance_id().unwrap().to_owned()
    });
    let launched = Instant::now();

    // The machine runs with the instance's private address.
    let address = wait_for(
        "the instance's machine running",
        Duration::from_secs(60),
        || {
            let status = lab.status();
            let machine = machine(&status, &instance_id)?;
            assert_ne!(machine["state"], "failed", "{machine:#}");
            (machine["state"] == "running").then(|| machine["address"].as_str().unwrap().to_owned())
        },
    );
    assert!(address.starts_with("172.31."), "{address}");

    // sshd answers, with host keys the machine made for itself at first boot.
    let host_key_file = lab
        .state
        .path()
        .join("machines")
        .join(&instance_id)
        .join("upper/etc/ssh/ssh_host_ed25519_key.pub");
    let host_key = wait_for(
        "the machine's own host key",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(&host_key_file)
                .ok()
                .filter(|k| k.ends_with('\n'))
        },
    );
    let known_hosts = keys.path().join("known_hosts");
    std::fs::write(&known_hosts, format!("{address} {host_key}")).unwrap();
    let ssh = Ssh {
        namespace: namespace.clone(),
        address: address.clone(),
        key: key.clone(),
        known_hosts,
    };
    wait_for(
        "SSH as admin at the private address",
        Duration::from_secs(60),
        || ssh.run("true").status.success().then_some(()),
    );
    let boot_to_ssh = launched.elapsed();
    assert_eq!(ssh.ok("id -un"), "admin");
    assert_eq!(ssh.ok("sudo -n id -un"), "root", "passwordless sudo");

    // From this machine's own network, through the lab's bastion, as rigger reaches servers
    // behind a jump host: the same machine answers; the bastion itself gives no shell and
    // forwards to machines' sshd only.
    let bastion = lab.status()["bastion"].clone();
    let jump = bastion["target"].as_str().expect("the bastion's target");
    assert!(jump.starts_with("nobody@127.31."), "{bastion:#}");
    let jump_known_hosts = keys.path().join("known_hosts.jump");
    std::fs::write(
        &jump_known_hosts,
        format!(
            "{}\n{address} {host_key}",
            bastion["known_hosts_line"].as_str().unwrap()
        ),
    )
    .unwrap();
    let through_bastion = |destination: &str, command: &[&str]| {
        let proxy = format!(
            "ssh -i {} -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -o BatchMode=yes -o LogLevel=ERROR -W %h:%p {jump}",
            key.display(),
            jump_known_hosts.display()
        );
        Command::new("ssh")
            .arg("-i")
            .arg(&key)
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", jump_known_hosts.display()))
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
            .args(["-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR"])
            .arg("-o")
            .arg(format!("ProxyCommand={proxy}"))
            .arg(destination)
            .args(command)
            .output()
            .expect("running ssh")
    };
    // The runner reads the emulator's key pairs every few seconds: the key imported for this
    // machine may not be the bastion's yet when the machine itself already answers.
    let hostname = wait_for(
        "the bastion to let the key pair's key in",
        Duration::from_secs(30),
        || {
            let answer = through_bastion(&format!("admin@{address}"), &["hostname"]);
            if !answer.status.success() {
                eprintln!("ssh through the bastion, not yet: {}", text(&answer));
            }
            answer.status.success().then_some(answer)
        },
    );
    assert_eq!(
        String::from_utf8_lossy(&hostname.stdout).trim(),
        format!("ip-{}", address.replace('.', "-"))
    );
    let shell = Command::new("ssh")
        .arg("-i")
        .arg(&key)
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", jump_known_hosts.display()))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg(jump)
        .arg("echo shell")
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&shell.stdout).contains("shell") && !shell.status.success(),
        "the bastion gave a shell: {}",
        text(&shell)
    );
    let other_port = Command::new("ssh")
        .arg("-i")
        .arg(&key)
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", jump_known_hosts.display()))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ])
        .args(["-W", &format!("{address}:80")])
        .arg(jump)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        !other_port.status.success(),
        "the bastion forwarded to port 80: {}",
        text(&other_port)
    );

    // The user-data ran once, logged as cloud-init logs it.
    wait_for("the user-data to finish", Duration::from_secs(60), || {
        ssh.run("sudo test -e /var/lib/cloud/instance/boot-finished")
            .status
            .success()
            .then_some(())
    });
    assert_eq!(ssh.ok("sudo cat /var/lib/lab-test/runs").lines().count(), 1);
    let log = ssh.ok("sudo cat /var/log/cloud-init-output.log");
    assert!(log.contains("the user-data exited with 0"), "{log}");

    // Its metadata service: IMDSv2 only, about this instance.
    let refused = ssh.ok(
        "curl -s -o /dev/null -w '%{http_code}' http://169.254.169.254/latest/meta-data/instance-id",
    );
    assert_eq!(refused, "401", "a request without a token is refused");
    let imds = |path: &str| {
        ssh.ok(&format!(
            "T=$(curl -fsS -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token) && \
             sudo curl -fsS -H \"X-aws-ec2-metadata-token: $T\" http://169.254.169.254/latest/{path}"
        ))
    };
    assert_eq!(imds("meta-data/instance-id"), instance_id);
    assert_eq!(imds("meta-data/local-ipv4"), address);
    assert_eq!(imds("meta-data/placement/availability-zone"), "us-east-1a");
    assert_eq!(imds("meta-data/iam/security-credentials/"), ROLE);
    let credentials: serde_json::Value =
        serde_json::from_str(&imds(&format!("meta-data/iam/security-credentials/{ROLE}"))).unwrap();
    // The emulator knows them as the role's, assumed for this instance.
    let caller = runtime.block_on(async {
        let conf = clients
            .sts
            .config()
            .to_builder()
            .credentials_provider(sts::config::Credentials::new(
                credentials["AccessKeyId"].as_str().unwrap(),
                credentials["SecretAccessKey"].as_str().unwrap(),
                credentials["Token"].as_str().map(str::to_owned),
                None,
                "lab-imds",
            ))
            .build();
        sts::Client::from_conf(conf)
            .get_caller_identity()
            .send()
            .await
            .expect("GetCallerIdentity with the machine's credentials")
    });
    let arn = caller.arn().unwrap_or_default();
    assert!(
        arn.contains(&format!("assumed-role/{ROLE}/{instance_id}")),
        "{arn}"
    );

    // No route leaves the lab: nothing is sent to a public address, it fails where it starts.
    let route = ssh.run("ip route get 8.8.8.8");
    assert!(
        !route.status.success(),
        "a route to a public address: {}",
        text(&route)
    );

    // Memory of the booted machine (the runner measures every few seconds).
    let memory = wait_for(
        "the machine's memory measured",
        Duration::from_secs(15),
        || machine(&lab.status(), &instance_id)?["memory_pss_bytes"].as_u64(),
    );

    // Root on the machine manages its own network (rigger's boot script loads nftables rules).
    ssh.ok("sudo nft add table inet lab_test && sudo nft delete table inet lab_test");

    // Stopped and started again: the same disk boots, the user-data does not run again.
    let start = || {
        runtime.block_on(async {
            clients
                .ec2
                .start_instances()
                .instance_ids(&instance_id)
                .send()
                .await
                .expect("StartInstances")
        });
    };
    let booted = || {
        wait_for("SSH after booting again", Duration::from_secs(60), || {
            ssh.run("systemctl is-system-running --wait >/dev/null; true")
                .status
                .success()
                .then_some(())
        });
        assert_eq!(
            ssh.ok("sudo cat /var/lib/lab-test/runs").lines().count(),
            1,
            "the user-data ran again"
        );
    };
    let stopped = |what: &str| {
        wait_for(what, Duration::from_secs(60), || {
            (machine(&lab.status(), &instance_id)?["state"] == "stopped").then_some(())
        });
    };
    runtime.block_on(async {
        clients
            .ec2
            .stop_instances()
            .instance_ids(&instance_id)
            .send()
            .await
            .expect("StopInstances")
    });
    stopped("the machine stopped");
    start();
    booted();

    // Rebooted from inside: it boots its disk again.
    let pid = machine(&lab.status(), &instance_id).unwrap()["pid"].clone();
    let _ = ssh.run("sudo systemctl reboot");
    wait_for("the machine booted again", Duration::from_secs(60), || {
        let status = lab.status();
        let machine = machine(&status, &instance_id)?;
        (machine["state"] == "running" && machine["pid"] != pid).then_some(())
    });
    booted();

    // Powered off from inside: the instance stops, as on EC2.
    let _ = ssh.run("sudo systemctl poweroff");
    stopped("the machine powered off");
    let state = runtime.block_on(async {
        let described = clients
            .ec2
            .describe_instances()
            .instance_ids(&instance_id)
            .send()
            .await
            .expect("DescribeInstances");
        described.reservations()[0].instances()[0]
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_owned())
    });
    assert_eq!(state.as_deref(), Some("stopped"));
    start();
    booted();

    // Terminated: the machine, its namespace and its disk's mount are gone.
    runtime.block_on(async {
        clients
            .ec2
            .terminate_instances()
            .instance_ids(&instance_id)
            .send()
            .await
            .expect("TerminateInstances")
    });
    let machine_namespace = format!("{namespace}-{instance_id}");
    wait_for("the machine removed", Duration::from_secs(60), || {
        machine(&lab.status(), &instance_id).is_none().then_some(())
    });
    assert!(!namespaces().contains(&machine_namespace));
    assert!(
        !lab.state
            .path()
            .join("machines")
            .join(&instance_id)
            .exists()
    );

    let down = lab.rigger(&["down"]);
    assert!(down.status.success(), "rigger lab down: {}", text(&down));
    assert_nothing_left(&lab, &started);

    eprintln!(
        "lab: launch to SSH {:.1} s; machine memory (PSS) {:.0} MiB",
        boot_to_ssh.as_secs_f64(),
        memory as f64 / 1_048_576.0
    );
}

#[test]
#[ignore = "end to end: scripts/test runs it after the other tests (-- --ignored)"]
fn down_cleans_up_after_a_killed_runner() {
    let (lab, started) = start_lab();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let clients = connect(&runtime, &started.endpoint);
    let instance_id = runtime.block_on(async {
        let subnet = default_subnet(&clients).await;
        let launched = clients
            .ec2
            .run_instances()
            .image_id(&started.ami)
            .instance_type(ec2::types::InstanceType::T3Micro)
            .min_count(1)
            .max_count(1)
            .subnet_id(subnet)
            .send()
            .await
            .expect("RunInstances");
        launched.instances()[0].instance_id().unwrap().to_owned()
    });
    wait_for(
        "the instance's machine running",
        Duration::from_secs(60),
        || (machine(&lab.status(), &instance_id)?["state"] == "running").then_some(()),
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(started.runner_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let broken = wait_for("the lab reported broken", Duration::from_secs(10), || {
        let status = lab.status();
        (status["state"] == "broken").then_some(status)
    });
    let leftovers = broken["leftovers"].to_string();
    for expected in [
        "lab emulator",
        "machine ",
        "network namespace",
        "mount ",
        "cgroup ",
    ] {
        assert!(leftovers.contains(expected), "{expected} in {leftovers}");
    }
    let down = lab.rigger(&["down"]);
    assert!(down.status.success(), "rigger lab down: {}", text(&down));
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("cleaning up"),
        "{}",
        text(&down)
    );
    assert_nothing_left(&lab, &started);
}

#[test]
#[ignore = "end to end: scripts/test runs it after the other tests (-- --ignored)"]
fn up_without_an_image_says_how_to_build_it() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the lab needs root: run the tests as root (scripts/test)"
    );
    let images = tempfile::tempdir().unwrap();
    let lab = TestLab::new(images.path().to_path_buf());
    let up = lab.rigger(&["up", "--emulator", "/bin/true"]);
    assert_eq!(up.status.code(), Some(1), "{}", text(&up));
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(stderr.contains("no stock lab image"), "{stderr}");
    assert!(stderr.contains("rigger lab image"), "{stderr}");
    assert_eq!(lab.status()["state"], "down");
    // The lab runs an emulator of its own: another endpoint is a mistake, not ignored.
    let misdirected = lab.rigger(&["--endpoint-url", "http://127.0.0.1:1", "status"]);
    assert_eq!(misdirected.status.code(), Some(2), "{}", text(&misdirected));
}
