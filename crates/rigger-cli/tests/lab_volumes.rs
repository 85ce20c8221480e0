//! The lab's EBS volumes and Auto Scaling end to end.
//!
//! Volumes: a volume attached to a machine that is already up appears in it as a Xen
//! instance names it (`/dev/sdf` -> `/dev/xvdf`); rigger's own boot-script functions
//! (`mount_data_volume`, `needs_data_volume`) format and mount it by UUID; a reboot from inside
//! mounts it again from fstab before the unit that needs it starts; it outlives its instance
//! and carries its files to the next machine it is attached to; a detach while mounted keeps
//! it busy until unmounted (AWS's unforced detach); deleting it removes its file.
//!
//! Auto Scaling: a group's machine gets its launch template's instance profile (credentials
//! from the metadata service; the emulator launches it without one); its `systemd-nspawn`
//! killed, the group is told and launches a replacement, which boots; the group keeps one in
//! service, and `rigger lab status` says what was replaced.
//!
//! Both: `rigger lab down` leaves nothing, no loop device either. Needs root, the lab image
//! (`rigger lab image`) and moto (scripts/moto.sh); fails, never skips, when one is missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rigger_aws::Clients;
use rigger_aws::lab::sdk::{autoscaling, ec2};

mod lab_support;
use lab_support::*;

const KEY_PAIR: &str = "lab-volumes";
const ROLE: &str = "lab-volumes-role";
const PROFILE: &str = "lab-volumes-profile";
const TEMPLATE: &str = "lab-volumes-template";
const GROUP: &str = "lab-volumes-group";
const PROOF: &str = "written before the reboot, on the data volume";

#[test]
fn volumes_are_block_devices_that_outlive_machines() {
    let (lab, started) = start_lab();
    let keys = key_pair();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let clients = connect(&runtime, &started.endpoint);
    let (first, volume) = runtime.block_on(async {
        import_key_pair(&clients, &keys).await;
        let first = run_instance(&clients, &started.ami).await;
        let volume = clients
            .ec2
            .create_volume()
            .availability_zone("us-east-1a")
            .size(1)
            .send()
            .await
            .expect("CreateVolume")
            .volume_id()
            .unwrap()
            .to_owned();
        (first, volume)
    });
    let ssh = reach(&lab, &started, &keys, &first);

    // Its backing file, sparse, at its size, before it is attached anywhere.
    let file = lab
        .state
        .path()
        .join("volumes")
        .join(format!("{volume}.img"));
    wait_for("the volume's backing file", Duration::from_secs(10), || {
        std::fs::metadata(&file).ok().filter(|m| m.len() == 1 << 30)
    });

    // Attached to a machine that is up: hot-plugged, where rigger's boot script looks.
    runtime.block_on(attach(&clients, &volume, &first));
    let attached = Instant::now();
    wait_for("/dev/xvdf in the machine", Duration::from_secs(30), || {
        ssh.run("test -b /dev/xvdf").status.success().then_some(())
    });
    eprintln!(
        "hot-plug: AttachVolume to /dev/xvdf in the machine: {:?}",
        attached.elapsed()
    );

    // The boot script's own functions find it, format it, mount it by UUID (fstab, nofail),
    // and keep a unit from starting without it.
    run_as_root(
        &lab,
        &ssh,
        &format!(
            "{}
cat >/etc/systemd/system/data-reader.service <<'UNIT'
[Unit]
Description=reads the data volume at boot
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'cat /data/proof >/run/proof-seen'
[Install]
WantedBy=multi-user.target
UNIT
mount_data_volume /data {volume}
needs_data_volume data-reader.service /data
printf '%s\\n' '{PROOF}' >/data/proof
systemctl daemon-reload
systemctl enable data-reader.service
sync
",
            data_volume_functions()
        ),
    );
    assert_eq!(ssh.ok("findmnt -no SOURCE,FSTYPE /data"), "/dev/xvdf ext4");
    let uuid = ssh.ok("sudo blkid -p -o value -s UUID /dev/xvdf");
    assert!(
        ssh.ok("cat /etc/fstab")
            .contains(&format!("UUID={uuid} /data ext4 defaults,nofail 0 2")),
        "the fstab line names the filesystem's UUID"
    );
    // udev's link, as the lab makes it once the disk holds a filesystem.
    wait_for("the by-uuid link", Duration::from_secs(10), || {
        (ssh.run(&format!("readlink -f /dev/disk/by-uuid/{uuid}"))
            .stdout
            == b"/dev/xvdf\n")
            .then_some(())
    });

    // A reboot from inside: fstab mounts it again, before the unit that needs it.
    let before = machine_pid(&lab, &first);
    let _ = ssh.run("sudo reboot");
    let rebooted = Instant::now();
    wait_for("the machine booting again", Duration::from_secs(60), || {
        let pid = machine_pid(&lab, &first);
        (pid.is_some() && pid != before).then_some(())
    });
    wait_for("SSH after the reboot", Duration::from_secs(60), || {
        ssh.run("systemctl is-system-running --wait >/dev/null; true")
            .status
            .success()
            .then_some(())
    });
    eprintln!(
        "reboot with the volume: SSH again after {:?}",
        rebooted.elapsed()
    );
    assert_eq!(ssh.ok("findmnt -no SOURCE,FSTYPE /data"), "/dev/xvdf ext4");
    assert_eq!(ssh.ok("cat /data/proof"), PROOF);
    assert_eq!(ssh.ok("systemctl is-active data-reader.service"), "active");
    assert_eq!(ssh.ok("cat /run/proof-seen"), PROOF);

    // Its instance terminated: the volume stays, with its file, unplugged.
    runtime.block_on(async {
        clients
            .ec2
            .terminate_instances()
            .instance_ids(&first)
            .send()
            .await
            .expect("TerminateInstances");
    });
    wait_for("the machine removed", Duration::from_secs(60), || {
        machine(&lab.status(), &first).is_none().then_some(())
    });
    assert_eq!(
        runtime.block_on(volume_state(&clients, &volume)),
        "available"
    );
    wait_for("the loop device detached", Duration::from_secs(10), || {
        loop_devices_of(&file).is_empty().then_some(())
    });
    assert!(file.exists(), "the volume's file outlives its instance");

    // Attached to a new machine: the file written on the first one is there.
    let second = runtime.block_on(run_instance(&clients, &started.ami));
    let ssh = reach(&lab, &started, &keys, &second);
    runtime.block_on(attach(&clients, &volume, &second));
    wait_for(
        "/dev/xvdf in the new machine",
        Duration::from_secs(30),
        || ssh.run("test -b /dev/xvdf").status.success().then_some(()),
    );
    run_as_root(
        &lab,
        &ssh,
        &format!(
            "{}\nmount_data_volume /data {volume}\n",
            data_volume_functions()
        ),
    );
    assert_eq!(ssh.ok("cat /data/proof"), PROOF);
    assert_eq!(
        ssh.ok("sudo blkid -p -o value -s UUID /dev/xvdf"),
        uuid,
        "found as rigger's own filesystem, not formatted again"
    );

    // Detached while mounted: gone from /dev at once, but busy (still mounted) until
    // unmounted, as an unforced detach on AWS; then its loop device goes.
    runtime.block_on(async {
        clients
            .ec2
            .detach_volume()
            .volume_id(&volume)
            // The emulator needs the instance (AWS does not).
            .instance_id(&second)
            .send()
            .await
            .expect("DetachVolume");
    });
    wait_for(
        "/dev/xvdf gone from the machine",
        Duration::from_secs(30),
        || {
            ssh.run("test -e /dev/xvdf")
                .status
                .code()
                .eq(&Some(1))
                .then_some(())
        },
    );
    assert_eq!(ssh.ok("cat /data/proof"), PROOF, "still mounted: busy");
    assert_eq!(loop_devices_of(&file).len(), 1, "busy until unmounted");
    ssh.ok("sudo umount /data");
    wait_for("the loop device released", Duration::from_secs(10), || {
        loop_devices_of(&file).is_empty().then_some(())
    });

    // Deleted: its file goes.
    runtime.block_on(async {
        clients
            .ec2
            .delete_volume()
            .volume_id(&volume)
            .send()
            .await
            .expect("DeleteVolume");
    });
    wait_for("the volume's file removed", Duration::from_secs(10), || {
        (!file.exists()).then_some(())
    });

    take_down(&lab, &started);
}

#[test]
fn a_dead_group_machine_is_replaced_and_group_machines_get_their_instance_profile() {
    let (lab, started) = start_lab();
    let keys = key_pair();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let clients = connect(&runtime, &started.endpoint);
    let first = runtime.block_on(async {
        import_key_pair(&clients, &keys).await;
        instance_profile(&clients).await;
        clients
            .ec2
            .create_launch_template()
            .launch_template_name(TEMPLATE)
            .launch_template_data(
                ec2::types::RequestLaunchTemplateData::builder()
                    .image_id(&started.ami)
                    .instance_type(ec2::types::InstanceType::T3Micro)
                    .key_name(KEY_PAIR)
                    .iam_instance_profile(
                        ec2::types::LaunchTemplateIamInstanceProfileSpecificationRequest::builder()
                            .name(PROFILE)
                            .build(),
                    )
                    .metadata_options(
                        ec2::types::LaunchTemplateInstanceMetadataOptionsRequest::builder()
                            .http_tokens(ec2::types::LaunchTemplateHttpTokensState::Required)
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .expect("CreateLaunchTemplate");
        let subnet = default_subnet(&clients).await;
        clients
            .autoscaling
            .create_auto_scaling_group()
            .auto_scaling_group_name(GROUP)
            .launch_template(
                autoscaling::types::LaunchTemplateSpecification::builder()
                    .launch_template_name(TEMPLATE)
                    .version("$Latest")
                    .build(),
            )
            .min_size(1)
            .max_size(1)
            .desired_capacity(1)
            .vpc_zone_identifier(subnet)
            .send()
            .await
            .expect("CreateAutoScalingGroup");
        let members = in_service(&clients).await;
        assert_eq!(members.len(), 1, "{members:?}");
        members[0].clone()
    });

    // The launch template's instance profile, served by the machine's metadata service.
    let ssh = reach(&lab, &started, &keys, &first);
    assert_credentials(&ssh);

    // Its systemd-nspawn killed: the group is told and launches a replacement, which boots.
    let pid = machine_pid(&lab, &first).expect("the machine runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    let replacement = wait_for(
        "a replacement in the group",
        Duration::from_secs(60),
        || {
            let members = runtime.block_on(in_service(&clients));
            members.into_iter().find(|id| id != &first)
        },
    );
    let ssh = reach(&lab, &started, &keys, &replacement);
    eprintln!(
        "kill of a group machine -> its replacement answering SSH: {:?}",
        killed.elapsed()
    );
    assert_credentials(&ssh);
    let members = runtime.block_on(in_service(&clients));
    assert_eq!(members, [replacement], "one in service, the new one");
    let capacity = runtime.block_on(async {
        clients
            .autoscaling
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(GROUP)
            .send()
            .await
            .expect("DescribeAutoScalingGroups")
            .auto_scaling_groups()[0]
            .desired_capacity()
    });
    assert_eq!(capacity, Some(1), "the group did not shrink");
    wait_for("the dead machine removed", Duration::from_secs(60), || {
        machine(&lab.status(), &first).is_none().then_some(())
    });

    // The status says what was replaced and why.
    let status = lab.status();
    let replaced = status["replaced"].as_array().unwrap();
    assert_eq!(replaced.len(), 1, "{status:#}");
    assert_eq!(replaced[0]["group"], GROUP);
    assert_eq!(replaced[0]["instance_id"], first.as_str());
    assert!(
        replaced[0]["reason"].as_str().unwrap().contains("SIGKILL"),
        "{status:#}"
    );
    let text = lab.rigger(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("{GROUP}: 1 replaced; last {first}")),
        "{text}"
    );

    take_down(&lab, &started);
}

/// A fresh ed25519 key pair in a directory of its own.
struct Keys {
    dir: tempfile::TempDir,
    private: PathBuf,
    public: String,
}

fn key_pair() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("id_ed25519");
    let generated = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&private)
        .output()
        .unwrap();
    assert!(
        generated.status.success(),
        "ssh-keygen: {}",
        text(&generated)
    );
    let public = std::fs::read_to_string(private.with_extension("pub")).unwrap();
    Keys {
        dir,
        private,
        public,
    }
}

async fn import_key_pair(clients: &Clients, keys: &Keys) {
    clients
        .ec2
        .import_key_pair()
        .key_name(KEY_PAIR)
        .public_key_material(ec2::primitives::Blob::new(keys.public.as_bytes()))
        .send()
        .await
        .expect("ImportKeyPair");
}

async fn run_instance(clients: &Clients, ami: &str) -> String {
    let subnet = default_subnet(clients).await;
    let launched = clients
        .ec2
        .run_instances()
        .image_id(ami)
        .instance_type(ec2::types::InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .key_name(KEY_PAIR)
        .subnet_id(subnet)
        .metadata_options(
            ec2::types::InstanceMetadataOptionsRequest::builder()
                .http_tokens(ec2::types::HttpTokensState::Required)
                .build(),
        )
        .send()
        .await
        .expect("RunInstances");
    launched.instances()[0].instance_id().unwrap().to_owned()
}

async fn attach(clients: &Clients, volume: &str, instance: &str) {
    clients
        .ec2
        .attach_volume()
        .volume_id(volume)
        .instance_id(instance)
        .device("/dev/sdf")
        .send()
        .await
        .expect("AttachVolume");
}

async fn volume_state(clients: &Clients, volume: &str) -> String {
    clients
        .ec2
        .describe_volumes()
        .volume_ids(volume)
        .send()
        .await
        .expect("DescribeVolumes")
        .volumes()[0]
        .state()
        .unwrap()
        .as_str()
        .to_owned()
}

async fn instance_profile(clients: &Clients) {
    clients
        .iam
        .create_role()
        .role_name(ROLE)
        .assume_role_policy_document(
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#,
        )
        .send()
        .await
        .expect("CreateRole");
    clients
        .iam
        .create_instance_profile()
        .instance_profile_name(PROFILE)
        .send()
        .await
        .expect("CreateInstanceProfile");
    clients
        .iam
        .add_role_to_instance_profile()
        .instance_profile_name(PROFILE)
        .role_name(ROLE)
        .send()
        .await
        .expect("AddRoleToInstanceProfile");
}

/// The group's instances in service.
async fn in_service(clients: &Clients) -> Vec<String> {
    let groups = clients
        .autoscaling
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(GROUP)
        .send()
        .await
        .expect("DescribeAutoScalingGroups");
    groups.auto_scaling_groups()[0]
        .instances()
        .iter()
        .filter(|i| i.lifecycle_state() == Some(&autoscaling::types::LifecycleState::InService))
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect()
}

/// The pid of the instance's running `systemd-nspawn`, from the lab's status.
fn machine_pid(lab: &TestLab, instance_id: &str) -> Option<i64> {
    let status = lab.status();
    let machine = machine(&status, instance_id)?;
    (machine["state"] == "running")
        .then(|| machine["pid"].as_i64())
        .flatten()
}

/// SSH to the instance's machine once it runs, trusting the host key read from its disk.
fn reach(lab: &TestLab, started: &Started, keys: &Keys, instance_id: &str) -> Ssh {
    let address = wait_for(
        "the instance's machine running",
        Duration::from_secs(60),
        || {
            let status = lab.status();
            let machine = machine(&status, instance_id)?;
            assert_ne!(machine["state"], "failed", "{machine:#}");
            (machine["state"] == "running").then(|| machine["address"].as_str().unwrap().to_owned())
        },
    );
    let upper = lab
        .state
        .path()
        .join("machines")
        .join(instance_id)
        .join("upper");
    let host_key = wait_for(
        "the machine's own host key",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(upper.join("etc/ssh/ssh_host_ed25519_key.pub"))
                .ok()
                .filter(|k| k.ends_with('\n'))
        },
    );
    let known_hosts = keys.dir.path().join(format!("known_hosts-{instance_id}"));
    std::fs::write(&known_hosts, format!("{address} {host_key}")).unwrap();
    let ssh = Ssh {
        namespace: started.namespace.clone(),
        address,
        key: keys.private.clone(),
        known_hosts,
    };
    wait_for("SSH as admin", Duration::from_secs(60), || {
        ssh.run("true").status.success().then_some(())
    });
    ssh
}

/// rigger's boot-script functions for the data volume, with the two its prelude gives them.
fn data_volume_functions() -> String {
    format!(
        "log() {{ echo \"$*\" >&2; }}\ndie() {{ log \"error: $*\"; exit 1; }}\n{}",
        rigger_aws::userdata::DATA_VOLUME_FUNCTIONS
    )
}

/// Runs `script` with bash as root in the machine (sent base64-encoded: it holds quotes and
/// here-documents).
fn run_as_root(lab: &TestLab, ssh: &Ssh, script: &str) {
    let encoded = base64::engine::general_purpose::STANDARD.encode(script);
    let output = ssh.run(&format!(
        "echo {encoded} | base64 -d | sudo bash -eu -o pipefail"
    ));
    assert!(
        output.status.success(),
        "the script failed in the machine ({}): {}\nlosetup: {:?}\nrunner: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        losetup_lines(),
        std::fs::read_to_string(lab.state.path().join("runner.log")).unwrap_or_default()
    );
}

/// The metadata service serves the role's credentials (IMDSv2), never printed.
fn assert_credentials(ssh: &Ssh) {
    let imds = "TOKEN=$(curl -sf -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' \
                http://169.254.169.254/latest/api/token) && curl -sf -H \"X-aws-ec2-metadata-token: $TOKEN\" \
                http://169.254.169.254/latest/meta-data/iam/security-credentials/";
    assert_eq!(ssh.ok(imds), ROLE);
    let credentials = ssh.run(&format!("{imds}{ROLE}"));
    assert!(credentials.status.success(), "the role's credentials");
    let credentials: serde_json::Value =
        serde_json::from_slice(&credentials.stdout).expect("credentials JSON");
    assert_eq!(credentials["Code"], "Success");
    assert!(
        credentials["AccessKeyId"]
            .as_str()
            .is_some_and(|k| !k.is_empty())
    );
    assert!(credentials["Token"].as_str().is_some_and(|k| !k.is_empty()));
}

/// The loop devices backed by `file`, as `losetup` lists them.
fn loop_devices_of(file: &Path) -> Vec<String> {
    losetup_lines()
        .into_iter()
        .filter(|line| line.contains(&file.display().to_string()))
        .collect()
}

fn losetup_lines() -> Vec<String> {
    let output = Command::new("losetup").arg("-a").output().unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `rigger lab down`, then nothing of the lab is left: no loop device either.
fn take_down(lab: &TestLab, started: &Started) {
    let down = lab.rigger(&["down"]);
    assert!(down.status.success(), "rigger lab down: {}", text(&down));
    assert_nothing_left(lab, started);
    let state = lab.state.path().display().to_string();
    let left: Vec<String> = losetup_lines()
        .into_iter()
        .filter(|line| line.contains(&state))
        .collect();
    assert!(left.is_empty(), "loop devices left: {left:?}");
    assert!(
        !lab.state
            .path()
            .join("volumes")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()),
        "volume files left"
    );
}
