//! The lab's EBS volumes and Auto Scaling end to end, through the real `rigger` binary.
//!
//! - A volume attached as `/dev/sdf` to a running machine appears inside as `/dev/xvdf`
//!   (hot-plugged); formatted, mounted and written there, with an fstab line (`nofail`) as
//!   rigger's boot script writes, it is mounted again after a reboot from inside (bound at
//!   boot, mounted by the lab's fstab generator); it outlives its instance (terminated) and
//!   holds the file in the next machine it is attached to; DeleteVolume removes its file.
//! - A group launched from a launch template that names an instance profile and a data volume:
//!   its machine gets the role's credentials from the metadata service (moto gives the
//!   instance no profile) and the volume at boot; a machine killed (SIGKILL to its
//!   `systemd-nspawn`) is replaced by the group, and the replacement boots.
//!
//! `rigger lab down` leaves nothing, no loop device either (also after the runner was
//! killed). Needs root, the lab image (`rigger lab image`) and moto (scripts/moto.sh); fails,
//! never skips, when one is missing.

mod hermetic;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rigger_aws::lab::sdk::{autoscaling, ec2};

mod lab_support;
use lab_support::*;

const KEY: &str = "lab-volumes";

struct Fixture {
    lab: TestLab,
    started: Started,
    keys: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    clients: rigger_aws::Clients,
    subnet: String,
}

impl Fixture {
    fn new() -> Fixture {
        let (lab, started) = start_lab();
        let keys = tempfile::tempdir().unwrap();
        let (_, public_key) = make_key(keys.path());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let clients = connect(&runtime, &started.endpoint);
        let subnet = runtime.block_on(async {
            import_key(&clients, KEY, &public_key).await;
            default_subnet(&clients).await
        });
        Fixture {
            lab,
            started,
            keys,
            runtime,
            clients,
            subnet,
        }
    }

    fn launch(&self) -> String {
        self.runtime.block_on(async {
            let launched = self
                .clients
                .ec2
                .run_instances()
                .image_id(&self.started.ami)
                .instance_type(ec2::types::InstanceType::T3Micro)
                .min_count(1)
                .max_count(1)
                .key_name(KEY)
                .subnet_id(&self.subnet)
                .send()
                .await
                .expect("RunInstances");
            launched.instances()[0].instance_id().unwrap().to_owned()
        })
    }

    fn machine_dir(&self, id: &str) -> PathBuf {
        self.lab.state.path().join("machines").join(id)
    }

    /// The pid of the machine's running `systemd-nspawn`, from the lab's status.
    fn nspawn_pid(&self, id: &str) -> Option<i64> {
        let status = self.lab.status();
        let machine = machine(&status, id)?;
        (machine["state"] == "running").then(|| machine["pid"].as_i64())?
    }

    /// SSH to instance `id` once it answers, trusting the host key on its machine's disk.
    fn ssh(&self, id: &str) -> Ssh {
        let address = wait_for("the machine's address", Duration::from_secs(60), || {
            let status = self.lab.status();
            let machine = machine(&status, id)?;
            (machine["state"] == "running")
                .then(|| machine["address"].as_str().map(str::to_owned))?
        });
        let host_key_file = self
            .machine_dir(id)
            .join("upper/etc/ssh/ssh_host_ed25519_key.pub");
        let host_key = wait_for("the machine's host key", Duration::from_secs(60), || {
            std::fs::read_to_string(&host_key_file).ok()
        });
        Ssh::when_up(
            &self.started.namespace,
            address,
            self.keys.path(),
            id,
            &host_key,
        )
    }

    fn volume_file(&self, volume: &str) -> PathBuf {
        self.lab
            .state
            .path()
            .join("volumes")
            .join(format!("{volume}.img"))
    }

    fn attach(&self, volume: &str, instance: &str) {
        self.runtime.block_on(async {
            self.clients
                .ec2
                .attach_volume()
                .volume_id(volume)
                .instance_id(instance)
                .device("/dev/sdf")
                .send()
                .await
                .expect("AttachVolume");
        });
    }

    fn down(&self) {
        let down = self.lab.rigger(&["down"]);
        assert!(down.status.success(), "rigger lab down: {}", text(&down));
        assert_nothing_left(&self.lab, &self.started);
        let loops = loop_devices_of(self.lab.state.path());
        assert!(loops.is_empty(), "loop devices left: {loops:?}");
    }
}

/// `losetup -a` lines of loop devices backed by a file under `dir`.
fn loop_devices_of(dir: &Path) -> Vec<String> {
    let output = Command::new("losetup").arg("-a").output().unwrap();
    let dir = dir.display().to_string();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains(&dir))
        .map(str::to_owned)
        .collect()
}

#[test]
#[ignore = "end to end: scripts/test runs it after the other tests (-- --ignored)"]
fn a_volume_is_a_disk_that_outlives_reboots_and_its_instance() {
    let f = Fixture::new();
    let first = f.launch();
    let ssh = f.ssh(&first);
    let volume = f.runtime.block_on(async {
        f.clients
            .ec2
            .create_volume()
            .availability_zone("us-east-1a")
            .size(1)
            .send()
            .await
            .expect("CreateVolume")
            .volume_id()
            .unwrap()
            .to_owned()
    });
    let attached = Instant::now();
    f.attach(&volume, &first);
    wait_for("/dev/xvdf in the machine", Duration::from_secs(30), || {
        ssh.run("test -b /dev/xvdf").status.success().then_some(())
    });
    eprintln!("hot-plugged in {:.2} s", attached.elapsed().as_secs_f64());
    assert_eq!(
        std::fs::metadata(f.volume_file(&volume)).unwrap().len(),
        1 << 30,
        "the volume's file has its size"
    );
    // As rigger's boot script does (mount_data_volume): format, mount, fstab by UUID, nofail.
    ssh.ok(
        "set -e; sudo mkfs.ext4 -q -L rigger-data /dev/xvdf; sudo install -d /data; \
         uuid=$(sudo blkid -p -o value -s UUID /dev/xvdf); \
         echo \"UUID=$uuid /data ext4 defaults,nofail 0 2\" | sudo tee -a /etc/fstab >/dev/null; \
         sudo mount /data; echo kept | sudo tee /data/file >/dev/null",
    );

    // A reboot from inside: the runner boots the disk again, with the volume bound at boot.
    let before = f.nspawn_pid(&first).expect("the machine runs");
    let _ = ssh.run("sudo systemctl reboot");
    let rebooted = Instant::now();
    wait_for("the machine to boot again", Duration::from_secs(60), || {
        f.nspawn_pid(&first).filter(|pid| *pid != before)
    });
    let ssh = f.ssh(&first);
    assert_eq!(
        ssh.ok("findmnt -n -o SOURCE /data; cat /data/file"),
        "/dev/xvdf\nkept",
        "the fstab line mounted the volume at boot"
    );
    eprintln!(
        "reboot to /data mounted and SSH: {:.2} s",
        rebooted.elapsed().as_secs_f64()
    );

    // Terminated: the volume stays (its file), detached from every loop device.
    f.runtime.block_on(async {
        f.clients
            .ec2
            .terminate_instances()
            .instance_ids(&first)
            .send()
            .await
            .expect("TerminateInstances");
    });
    wait_for("the machine removed", Duration::from_secs(60), || {
        (machine(&f.lab.status(), &first).is_none() && !f.machine_dir(&first).exists())
            .then_some(())
    });
    wait_for(
        "the volume's loop device detached",
        Duration::from_secs(30),
        || loop_devices_of(f.lab.state.path()).is_empty().then_some(()),
    );
    assert!(
        f.volume_file(&volume).exists(),
        "the volume outlives its instance"
    );

    // The next machine it is attached to finds the file.
    let second = f.launch();
    let ssh = f.ssh(&second);
    f.attach(&volume, &second);
    wait_for(
        "/dev/xvdf in the second machine",
        Duration::from_secs(30),
        || ssh.run("test -b /dev/xvdf").status.success().then_some(()),
    );
    assert_eq!(
        ssh.ok("sudo mount /dev/xvdf /mnt && cat /mnt/file && sudo umount /mnt"),
        "kept"
    );

    // Detached, then deleted: its node and its file go.
    f.runtime.block_on(async {
        f.clients
            .ec2
            .detach_volume()
            .volume_id(&volume)
            .instance_id(&second)
            .device("/dev/sdf")
            .send()
            .await
            .expect("DetachVolume");
    });
    wait_for(
        "/dev/xvdf gone from the machine",
        Duration::from_secs(30),
        || (!ssh.run("test -e /dev/xvdf").status.success()).then_some(()),
    );
    f.runtime.block_on(async {
        f.clients
            .ec2
            .delete_volume()
            .volume_id(&volume)
            .send()
            .await
            .expect("DeleteVolume");
    });
    wait_for(
        "the deleted volume's file removed",
        Duration::from_secs(30),
        || (!f.volume_file(&volume).exists()).then_some(()),
    );
    f.down();
}

/// The instances of group `group` that are in service or pending.
fn group_instances(f: &Fixture, group: &str) -> Vec<String> {
    f.runtime.block_on(async {
        let groups = f
            .clients
            .autoscaling
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(group)
            .send()
            .await
            .expect("DescribeAutoScalingGroups");
        groups.auto_scaling_groups()[0]
            .instances()
            .iter()
            .filter_map(|i| i.instance_id().map(str::to_owned))
            .collect()
    })
}

#[test]
#[ignore = "end to end: scripts/test runs it after the other tests (-- --ignored)"]
fn a_group_instance_has_its_profile_and_a_dead_one_is_replaced() {
    const ROLE: &str = "lab-volumes-role";
    const PROFILE: &str = "lab-volumes-profile";
    const GROUP: &str = "lab-volumes-group";
    let f = Fixture::new();
    f.runtime.block_on(async {
        make_instance_profile(&f.clients, ROLE, PROFILE).await;
        let data = ec2::types::RequestLaunchTemplateData::builder()
            .image_id(&f.started.ami)
            .instance_type(ec2::types::InstanceType::T3Micro)
            .key_name(KEY)
            .iam_instance_profile(
                ec2::types::LaunchTemplateIamInstanceProfileSpecificationRequest::builder()
                    .name(PROFILE)
                    .build(),
            )
            .block_device_mappings(
                ec2::types::LaunchTemplateBlockDeviceMappingRequest::builder()
                    .device_name("/dev/sdf")
                    .ebs(
                        ec2::types::LaunchTemplateEbsBlockDeviceRequest::builder()
                            .volume_size(1)
                            .delete_on_termination(true)
                            .build(),
                    )
                    .build(),
            )
            .build();
        let template = f
            .clients
            .ec2
            .create_launch_template()
            .launch_template_name("lab-volumes-template")
            .launch_template_data(data)
            .send()
            .await
            .expect("CreateLaunchTemplate");
        let template_id = template
            .launch_template()
            .and_then(|t| t.launch_template_id())
            .unwrap()
            .to_owned();
        f.clients
            .autoscaling
            .create_auto_scaling_group()
            .auto_scaling_group_name(GROUP)
            .launch_template(
                autoscaling::types::LaunchTemplateSpecification::builder()
                    .launch_template_id(template_id)
                    .version("$Latest")
                    .build(),
            )
            .min_size(1)
            .max_size(1)
            .desired_capacity(1)
            .vpc_zone_identifier(&f.subnet)
            .send()
            .await
            .expect("CreateAutoScalingGroup");
    });
    let first = wait_for("the group's instance", Duration::from_secs(30), || {
        group_instances(&f, GROUP).into_iter().next()
    });
    let ssh = f.ssh(&first);
    // IMDSv2, as the AWS CLI asks.
    let credentials = ssh.ok(
        "t=$(curl -sf -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' \
         http://169.254.169.254/latest/api/token); \
         h=\"X-aws-ec2-metadata-token: $t\"; \
         role=$(curl -sf -H \"$h\" http://169.254.169.254/latest/meta-data/iam/security-credentials/); \
         echo \"$role\"; curl -sf -H \"$h\" \"http://169.254.169.254/latest/meta-data/iam/security-credentials/$role\"",
    );
    let (role, document) = credentials.split_once('\n').unwrap();
    assert_eq!(role, ROLE, "{credentials}");
    let document: serde_json::Value = serde_json::from_str(document).unwrap();
    assert_eq!(document["Code"], "Success", "{document:#}");
    assert!(
        document["AccessKeyId"]
            .as_str()
            .is_some_and(|k| !k.is_empty()),
        "{document:#}"
    );
    // The launch template's data volume is there from the machine's first instant.
    ssh.ok("test -b /dev/xvdf");

    // Killed: the group replaces it, and the replacement boots.
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(f.machine_dir(&first).join("pids/nspawn.pid")).unwrap(),
    )
    .unwrap();
    let pid = record["pid"].as_i64().unwrap();
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
            group_instances(&f, GROUP)
                .into_iter()
                .find(|id| id != &first)
        },
    );
    let ssh = f.ssh(&replacement);
    eprintln!(
        "SIGKILL to the replacement answering SSH: {:.2} s",
        killed.elapsed().as_secs_f64()
    );
    ssh.ok("test -b /dev/xvdf");
    let status = f.lab.status();
    assert!(
        machine(&status, &first).is_none(),
        "the dead machine is removed with its instance: {status:#}"
    );
    // A runner killed with the replacement's volume plugged: down removes its loop device.
    assert!(!loop_devices_of(f.lab.state.path()).is_empty());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(f.started.runner_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("the runner gone", Duration::from_secs(10), || {
        (!is_running(f.started.runner_pid)).then_some(())
    });
    f.down();
}
