//! The user-data every kind of server boots with: valid bash (`bash -n`), clean under
//! shellcheck, and free of secret values.

mod common;

use std::process::Command;

use rigger_aws::environment::{AwsEnvironment, Cidr, Network, Subnet};
use rigger_aws::userdata::{DATA_VOLUME_FUNCTIONS, DataVolume};
use rigger_recipes::Role;

fn network() -> Network {
    Network {
        vpc_id: "vpc-1".into(),
        vpc_cidr: "172.31.0.0/16".parse::<Cidr>().unwrap(),
        subnets: ["a", "b"]
            .iter()
            .enumerate()
            .map(|(i, zone)| Subnet {
                id: format!("subnet-{i}"),
                zone: format!("us-east-1{zone}"),
                cidr: format!("172.31.{}.0/20", i * 16).parse::<Cidr>().unwrap(),
            })
            .collect(),
    }
}

fn env() -> AwsEnvironment {
    let text = common::config_text("", 2, "t3.small");
    AwsEnvironment::new(common::config(&text), "prod").unwrap()
}

/// A stand-alone server's data volume, as rigger attaches it.
fn attached() -> DataVolume {
    DataVolume::Attached("vol-0123456789abcdef0".into())
}

/// Every server kind: (label, roles, stand-alone id or None for a group server).
fn scripts() -> Vec<(String, String)> {
    let env = env();
    let network = network();
    let mut out = Vec::new();
    for role in [Role::Web, Role::Worker] {
        let ctx = env.context(&network, &[role], None, "r1");
        out.push((
            role.to_string(),
            rigger_aws::userdata::script(&env, &ctx, &DataVolume::Mapped).unwrap(),
        ));
    }
    for server in env.stand_alone_servers(&network) {
        let ctx = env.context(&network, &server.roles, Some(&server), "r1");
        out.push((
            server.id.clone(),
            rigger_aws::userdata::script(&env, &ctx, &attached()).unwrap(),
        ));
    }
    out
}

/// The web and worker servers' scripts at the first release (`up`'s, before any deploy).
fn first_release_scripts() -> Vec<(String, String)> {
    let env = env();
    let network = network();
    [Role::Web, Role::Worker]
        .into_iter()
        .map(|role| {
            let ctx = env.context(
                &network,
                &[role],
                None,
                rigger_plan::deploys::INITIAL_RELEASE,
            );
            (
                format!("{role}-first-release"),
                rigger_aws::userdata::script(&env, &ctx, &DataVolume::Mapped).unwrap(),
            )
        })
        .collect()
}

fn check_tool(tool: &str, args: &[&str], label: &str, script: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{label}.sh"));
    std::fs::write(&path, script).unwrap();
    let output = Command::new(tool)
        .args(args)
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("running {tool}: {e}"));
    assert!(
        output.status.success(),
        "{tool} rejects the user-data of {label}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn user_data_is_valid_bash() {
    for (label, script) in scripts().into_iter().chain(first_release_scripts()) {
        check_tool("bash", &["-n"], &label, &script);
    }
}

#[test]
fn user_data_passes_shellcheck() {
    for (label, script) in scripts().into_iter().chain(first_release_scripts()) {
        check_tool("shellcheck", &["-s", "bash"], &label, &script);
    }
}

#[test]
fn user_data_fetches_secrets_instead_of_carrying_them() {
    for (label, script) in scripts() {
        assert!(
            script.contains("aws ssm get-parameter --region \"$REGION\" --with-decryption"),
            "{label}"
        );
    }
    let (_, web) = &scripts()[0];
    assert!(web.contains("\nread_secrets RIGGER_SECRET_DB_PASSWORD_ db_password "));
}

/// Each server reads exactly the secrets its roles' recipes use: the only ones its instance
/// profile allows (a read of any other would fail the boot).
#[test]
fn each_server_fetches_only_its_own_secrets() {
    let fetched = |script: &str| -> Vec<String> {
        // `read_secrets PLACEHOLDER NAME ...`: every second word is a parameter's name.
        script
            .lines()
            .filter_map(|line| line.strip_prefix("read_secrets "))
            .flat_map(|words| {
                words
                    .split_whitespace()
                    .skip(1)
                    .step_by(2)
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let scripts = scripts();
    let of = |label: &str| {
        let (_, script) = scripts.iter().find(|(l, _)| l == label).unwrap();
        fetched(script)
    };
    let app = [
        "db_password",
        "redis_password",
        "rabbitmq_password",
        "django_secret_key",
        "pgbouncer_admin_password",
    ];
    assert_eq!(of("web"), app);
    assert_eq!(of("worker"), app);
    assert_eq!(of("cache"), ["redis_password", "rabbitmq_password"]);
    assert_eq!(of("db-primary"), ["db_password", "replication_password"]);
    assert_eq!(of("db-replica1"), ["replication_password"]);
}

#[test]
fn no_server_reads_the_ca_key() {
    for (label, script) in scripts() {
        assert!(!script.contains("ca_key"), "{label}");
        assert!(!script.contains("ca.key"), "{label}");
        assert!(!script.contains("-CAkey"), "{label}");
        assert!(
            script.contains("parameter ca_cert | put_stdin /etc/rigger/pki/ca.crt 0644 root"),
            "{label}"
        );
    }
}

/// A stand-alone server installs the certificate rigger signed for it; a group server, whose
/// only client is the load balancer, signs its own and checks its readiness against it.
#[test]
fn servers_get_their_certificate_without_the_ca() {
    for (label, script) in scripts() {
        if label == "web" || label == "worker" {
            assert!(script.contains("-signkey"), "{label}");
            assert!(!script.contains("parameter tls/"), "{label}");
        } else {
            assert!(
                script.contains(&format!("parameter tls/{label}/key | put_stdin ")),
                "{label}"
            );
            assert!(
                script.contains(&format!("parameter tls/{label}/cert | put_stdin ")),
                "{label}"
            );
            assert!(!script.contains("-signkey"), "{label}");
        }
    }
    let (_, web) = &scripts()[0];
    assert!(
        web.contains("-CAfile /etc/rigger/tls/server.crt -verify_return_error"),
        "nginx's readiness trusts its own certificate"
    );
}

/// Only root may reach the instance metadata service (so no service user can take the
/// instance role's credentials): the rule is loaded before packages are installed and any
/// service starts, and again at every boot.
#[test]
fn only_root_reaches_the_metadata_service() {
    for (label, script) in scripts() {
        assert!(
            script.contains("ip daddr 169.254.169.254 meta skuid != 0 reject"),
            "{label}"
        );
        assert!(script.contains("WantedBy=sysinit.target"), "{label}");
        let blocked = script
            .find("\nblock_metadata_for_non_root\n")
            .unwrap_or_else(|| panic!("{label}: the rule is never loaded"));
        for later in [
            "\ninstall_packages ",
            "\nstep 'reading secrets from SSM'",
            "\nstep 'starting the services'",
            "SELF_ID=$(imds",
        ] {
            if let Some(at) = script.find(later) {
                assert!(blocked < at, "{label}: {later:?} comes before the rule");
            }
        }
    }
}

/// The metadata rule is valid nftables (checked with `nft -c`, which applies nothing). Needs
/// root and nftables, which scripts/install-packages.sh installs.
#[test]
fn the_metadata_rule_is_valid_nftables() {
    let nft = std::path::Path::new("/usr/sbin/nft");
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt as _;
        m.uid() == 0
    });
    assert!(
        nft.exists() && root,
        "needs /usr/sbin/nft and root: run scripts/install-packages.sh, then the tests as root"
    );
    let (_, web) = &scripts()[0];
    let start = web.find("<<'RULES'\n").expect("the rules' here-document") + 10;
    let rules = &web[start..start + web[start..].find("\nRULES\n").unwrap() + 1];
    assert!(rules.contains("meta skuid != 0 reject"), "{rules}");
    check_tool("/usr/sbin/nft", &["-c", "-f"], "metadata-rules", rules);
}

#[test]
fn group_servers_learn_their_id_and_address_at_boot() {
    let (_, web) = &scripts()[0];
    assert!(web.contains("SELF_ID=$(imds instance-id)"));
    assert!(
        web.contains("${SELF_ADDRESS}"),
        "commands use the instance's address"
    );
    let (_, cache) = scripts().into_iter().find(|(l, _)| l == "cache").unwrap();
    assert!(
        !cache.contains("SELF_ID=$("),
        "stand-alone servers have fixed ids"
    );
    assert!(!cache.contains("${SELF_ID}"));
}

#[test]
fn user_data_fits_in_ec2s_limit() {
    let env = env();
    let network = network();
    for server in env.stand_alone_servers(&network) {
        let ctx = env.context(&network, &server.roles, Some(&server), "r1");
        rigger_aws::userdata::user_data(&env, &ctx, &attached()).unwrap();
    }
    for role in [Role::Web, Role::Worker] {
        for release in ["r1", rigger_plan::deploys::INITIAL_RELEASE] {
            let ctx = env.context(&network, &[role], None, release);
            rigger_aws::userdata::user_data(&env, &ctx, &DataVolume::Mapped).unwrap();
        }
    }
}

/// The first `up`'s web and worker servers boot with the app: they fetch the first release,
/// run its migrations (one server at a time, retried while the primary boots), and only then
/// start their services. Later releases are migrated by `rigger deploy`, not at boot.
#[test]
fn the_first_release_is_fetched_and_migrated_before_the_app_starts() {
    for (label, script) in first_release_scripts() {
        let fetch = script
            .find("\ninstall_release \"$bucket\" releases/initial.tar.gz \"$REGION\" /srv/shop/app /srv/shop/venv requirements.txt rigger-build\n")
            .unwrap_or_else(|| panic!("{label}: the first release is not fetched"));
        let migrate = script
            .find("\nretry 900 'step migrate' '' step_migrate\n")
            .unwrap_or_else(|| panic!("{label}: no migrations at boot"));
        let function = script.find("\nstep_migrate() {\n").unwrap();
        let app = if label.starts_with("web") {
            "\nsystemctl enable --now rigger-gunicorn.service\n"
        } else {
            "\nsystemctl enable --now rigger-celery-worker.service\n"
        };
        let app = script.find(app).unwrap_or_else(|| panic!("{label}"));
        assert!(
            fetch < function && function < migrate && migrate < app,
            "{label}"
        );
        let body = &script[function..migrate];
        assert!(
            body.contains("runuser -u www-data -- ")
                && body.contains("rigger-env /etc/rigger/app/app.env /usr/bin/env DATABASE_HOST=")
                && body.contains("PGSSLMODE=verify-full")
                && body.contains("manage.py shell -c")
                && body.contains("pg_advisory_lock"),
            "{label}: {body}"
        );
    }
    for (label, script) in scripts() {
        assert!(!script.contains("step_migrate"), "{label} migrates at boot");
    }
}

/// A replica launched with its primary retries its base backup (the primary may refuse
/// connections, or not have made `replicator` or the slot yet), emptying its data directory
/// between attempts, for up to 15 minutes; a single attempt left it empty for good.
#[test]
fn the_replica_retries_its_base_backup_until_the_primary_is_ready() {
    let (_, replica) = scripts()
        .into_iter()
        .find(|(l, _)| l == "db-replica1")
        .unwrap();
    let function = replica
        .find("\nstep_postgresql_basebackup() {\n")
        .expect("the base backup is a function retry runs");
    let call = replica
        .find("\n[ -e /var/lib/rigger/postgresql/PG_VERSION ] || retry 900 'step postgresql-basebackup' /var/lib/rigger/postgresql step_postgresql_basebackup\n")
        .expect("retried, emptying the data directory");
    assert!(function < call);
    assert!(
        replica[function..call]
            .contains("/usr/lib/postgresql/15/bin/pg_basebackup -D /var/lib/rigger/postgresql")
    );
    let start = replica
        .find("\nsystemctl enable --now rigger-postgresql.service\n")
        .unwrap();
    assert!(call < start);
}

/// Runs `line` after the retry function, with the prelude's `log` and `die`, stand-in
/// commands in `bin`, and a `sleep` that records each pause in `pauses` and moves bash's
/// clock (`SECONDS`) on instead of waiting. Returns (success, stdout, stderr).
fn run_retry(bin: &std::path::Path, line: &str) -> (bool, String, String) {
    let script = format!(
        "set -euo pipefail\nlog() {{ printf 'rigger: %s\\n' \"$*\" >&2; }}\ndie() {{ log \"error: $*\"; exit 1; }}\n\
         pauses=()\nsleep() {{ pauses+=(\"$1\"); SECONDS=$((SECONDS + $1)); }}\n\
         PATH={}:$PATH\n{}\n{line}\necho \"pauses: ${{pauses[*]}}\"\n",
        bin.display(),
        rigger_aws::userdata::RETRY_FUNCTION
    );
    let output = Command::new("bash").args(["-c", &script]).output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A stand-in `pg_basebackup -D DIR`: refuses a directory that is not empty (as the real one
/// does), leaves a half-made copy and fails until its `FAILURES`-th call has passed, then
/// makes a whole one. Counts its calls in `DIR/../calls`.
fn fake_basebackup(failures: u32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let path = bin.join("pg_basebackup");
    std::fs::write(
        &path,
        format!(
            "#!/bin/bash\nset -eu\ndata=$2\ncalls=$(dirname \"$data\")/calls\n\
             echo x >>\"$calls\"\n\
             if [ -n \"$(ls -A \"$data\")\" ]; then echo \"pg_basebackup: directory $data exists but is not empty\" >&2; exit 1; fi\n\
             echo half >\"$data/base.tar.partial\"\n\
             if [ \"$(wc -l <\"$calls\")\" -le {failures} ]; then echo 'pg_basebackup: error: connection refused' >&2; exit 1; fi\n\
             rm \"$data/base.tar.partial\"; echo 15 >\"$data/PG_VERSION\"\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn retry_runs_a_step_until_it_succeeds_emptying_its_directory_between_attempts() {
    let fake = fake_basebackup(3);
    let data = fake.path().join("data");
    let (ok, stdout, stderr) = run_retry(
        &fake.path().join("bin"),
        &format!(
            "retry 900 'step postgresql-basebackup' {data} pg_basebackup -D {data}",
            data = data.display()
        ),
    );
    assert!(ok, "{stderr}");
    // A half-made copy never made the next attempt fail as "not empty".
    assert!(!stderr.contains("not empty"), "{stderr}");
    for attempt in 1..=3 {
        assert!(
            stderr.contains(&format!(
                "rigger: step postgresql-basebackup: attempt {attempt} failed (exit status 1); trying again in"
            )),
            "{stderr}"
        );
    }
    assert!(stderr.contains("succeeded at attempt 4"), "{stderr}");
    assert_eq!(stdout.trim(), "pauses: 5 10 20");
    let left: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["PG_VERSION"]);
}

#[test]
fn retry_gives_up_at_its_limit_saying_so() {
    let fake = fake_basebackup(u32::MAX);
    let data = fake.path().join("data");
    let (ok, stdout, stderr) = run_retry(
        &fake.path().join("bin"),
        &format!(
            "retry 200 'step postgresql-basebackup' {data} pg_basebackup -D {data}",
            data = data.display()
        ),
    );
    assert!(!ok, "{stdout}");
    // Pauses of 5, 10, 20, 40, 60, 60 s: the next would end past 200 s.
    let calls = std::fs::read_to_string(fake.path().join("calls")).unwrap();
    assert_eq!(calls.lines().count(), 7, "{stderr}");
    assert!(
        stderr.contains("trying again in 40 s")
            && stderr.contains("attempt 6 failed (exit status 1); trying again in 60 s"),
        "{stderr}"
    );
    // 195 s of pauses, plus the real seconds the attempts took (a loaded machine adds some).
    let gave_up = stderr
        .split("rigger: error: step postgresql-basebackup: attempt 7 failed (exit status 1); giving up after ")
        .nth(1)
        .and_then(|rest| rest.strip_suffix(" s (its limit is 200 s)\n"))
        .and_then(|seconds| seconds.parse::<u32>().ok());
    assert!(
        gave_up.is_some_and(|seconds| (195..200).contains(&seconds)),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(&data).unwrap().count(),
        0,
        "left half-made"
    );
}

/// Debian's epmd listens on every address once enabled (a baked image has it on every
/// server): masked everywhere, and the queue server runs rigger's own, on its address and
/// loopback, before RabbitMQ.
#[test]
fn debians_epmd_is_masked_and_the_queue_server_runs_riggers_own() {
    for (label, script) in scripts().into_iter().chain(first_release_scripts()) {
        assert!(
            script.contains("\n  systemctl mask epmd.socket epmd.service >/dev/null\n"),
            "{label}: Debian's epmd is not masked"
        );
        let mask = script
            .find("\nleave_debian_daemons_off\n")
            .unwrap_or_else(|| panic!("{label}: Debian's daemons are left on"));
        let install = script.find("\ninstall_packages ").unwrap();
        assert!(install < mask, "{label}");
    }
    let (_, cache) = scripts().into_iter().find(|(l, _)| l == "cache").unwrap();
    let epmd = cache
        .find("\nsystemctl enable --now rigger-epmd.service\n")
        .expect("rigger's epmd");
    let rabbitmq = cache
        .find("\nsystemctl enable --now rigger-rabbitmq.service\n")
        .unwrap();
    assert!(epmd < rabbitmq);
    assert!(cache.contains("\nwait_ready epmd 300 ready_epmd\n"));
}

#[test]
fn every_server_publishes_its_host_keys_and_mounts_its_own_volume() {
    for (label, script) in scripts() {
        let publish = script
            .find("\npublish_host_keys ||")
            .unwrap_or_else(|| panic!("{label}"));
        let install = script.find("\ninstall_packages ").unwrap();
        assert!(
            install < publish,
            "{label}: keys published before the AWS CLI is there"
        );
        let volume = if label.starts_with("web") || label.starts_with("worker") {
            "''"
        } else {
            "vol-0123456789abcdef0"
        };
        assert!(
            script.contains(&format!("\nmount_data_volume /var/lib/rigger {volume}\n")),
            "{label}"
        );
        // Every unit needs the data volume mounted, written before systemd reads the units.
        let reload = script
            .find("\nsystemctl daemon-reload\nsystemd-tmpfiles")
            .unwrap();
        let needs = script
            .find("\nneeds_data_volume ")
            .unwrap_or_else(|| panic!("{label}"));
        assert!(needs < reload, "{label}");
    }
    let (_, db) = scripts()
        .into_iter()
        .find(|(l, _)| l == "db-primary")
        .unwrap();
    assert!(db.contains("\nneeds_data_volume rigger-postgresql.service /var/lib/rigger\n"));
}

/// A fake `/dev` of a Nitro instance: the root EBS disk, instance storage, and EBS volumes
/// with the given serials (`vol...`), each an NVMe namespace linked by udev's rules.
struct FakeDev {
    root: tempfile::TempDir,
}

impl FakeDev {
    fn nitro(ebs: &[&str]) -> FakeDev {
        let fake = FakeDev {
            root: tempfile::tempdir().unwrap(),
        };
        let by_id = fake.root.path().join("dev/disk/by-id");
        std::fs::create_dir_all(&by_id).unwrap();
        let mut disks = vec![
            (
                "nvme0n1",
                "Amazon_Elastic_Block_Store_vol0aaaaaaaaaaaaaaaa".to_owned(),
            ),
            (
                "nvme1n1",
                "Amazon_EC2_NVMe_Instance_Storage_AWS1F2E3D4C5B6A7980".to_owned(),
            ),
        ];
        let names = ["nvme2n1", "nvme3n1", "nvme4n1"];
        for (serial, name) in ebs.iter().zip(names) {
            disks.push((name, format!("Amazon_Elastic_Block_Store_{serial}")));
        }
        for (device, model_serial) in disks {
            std::fs::write(fake.root.path().join("dev").join(device), "").unwrap();
            let link = by_id.join(format!("nvme-{model_serial}"));
            std::os::unix::fs::symlink(format!("../../{device}"), &link).unwrap();
            // Newer udev adds the namespace, and partitions have links of their own.
            std::os::unix::fs::symlink(
                format!("../../{device}"),
                by_id.join(format!("nvme-{model_serial}_1")),
            )
            .unwrap();
            std::fs::write(fake.root.path().join(format!("dev/{device}p1")), "").unwrap();
            std::os::unix::fs::symlink(
                format!("../../{device}p1"),
                by_id.join(format!("nvme-{model_serial}-part1")),
            )
            .unwrap();
        }
        fake
    }

    fn dev(&self, name: &str) -> String {
        self.root
            .path()
            .join("dev")
            .join(name)
            .display()
            .to_string()
    }

    /// What `data_device ROOT VOLUME ROOT_DISK` prints, or its error.
    fn data_device(&self, volume: &str) -> Result<String, String> {
        run_functions(&format!(
            "data_device {} {volume} {}",
            self.root.path().display(),
            self.dev("nvme0n1")
        ))
    }
}

/// Runs `line` after the data volume functions (with the prelude's `log`).
fn run_functions(line: &str) -> Result<String, String> {
    let script = format!(
        "set -euo pipefail\nlog() {{ printf 'rigger: %s\\n' \"$*\" >&2; }}\n{DATA_VOLUME_FUNCTIONS}\n{line}\n"
    );
    let output = Command::new("bash").args(["-c", &script]).output().unwrap();
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[test]
fn the_data_volume_is_the_ebs_volume_with_its_id_never_instance_storage() {
    let fake = FakeDev::nitro(&["vol0123456789abcdef0", "vol0fedcba9876543210"]);
    assert_eq!(
        fake.data_device("vol-0123456789abcdef0"),
        Ok(fake.dev("nvme2n1"))
    );
    assert_eq!(
        fake.data_device("vol-0fedcba9876543210"),
        Ok(fake.dev("nvme3n1"))
    );
    // Not attached (yet): nothing, so the caller waits; instance storage is never taken.
    assert_eq!(fake.data_device("vol-0999999999999999"), Ok(String::new()));
    let only_instance_storage = FakeDev::nitro(&[]);
    assert_eq!(only_instance_storage.data_device("''"), Ok(String::new()));
    // The root disk is never the data volume, even when named.
    assert_eq!(fake.data_device("vol-0aaaaaaaaaaaaaaaa"), Ok(String::new()));
}

#[test]
fn a_group_servers_data_volume_is_its_one_other_ebs_disk() {
    let fake = FakeDev::nitro(&["vol0123456789abcdef0"]);
    assert_eq!(fake.data_device("''"), Ok(fake.dev("nvme2n1")));
    let two = FakeDev::nitro(&["vol0123456789abcdef0", "vol0fedcba9876543210"]);
    let error = two.data_device("''").unwrap_err();
    assert!(
        error.contains("two EBS disks could be the data volume"),
        "{error}"
    );
}

#[test]
fn on_xen_the_data_volume_is_the_mapped_device() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("dev")).unwrap();
    let xvdb = root.path().join("dev/xvdb");
    std::fs::write(&xvdb, "").unwrap();
    let run = || {
        run_functions(&format!(
            "data_device {} vol-0123456789abcdef0 {}/dev/xvda",
            root.path().display(),
            root.path().display()
        ))
    };
    // Instance storage (xvdb) only: not attached yet.
    assert_eq!(run(), Ok(String::new()));
    let xvdf = root.path().join("dev/xvdf");
    std::fs::write(&xvdf, "").unwrap();
    assert_eq!(run(), Ok(xvdf.display().to_string()));
}

#[test]
fn only_an_empty_disk_or_riggers_own_filesystem_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let disk = |name: &str, mkfs: Option<&[&str]>| {
        let path = dir.path().join(name);
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(16 * 1024 * 1024).unwrap();
        if let Some(args) = mkfs {
            let status = Command::new(args[0])
                .args(&args[1..])
                .arg(&path)
                .output()
                .unwrap();
            assert!(status.status.success(), "{args:?}: {status:?}");
        }
        path.display().to_string()
    };
    let empty = disk("empty", None);
    let ours = disk("ours", Some(&["mkfs.ext4", "-q", "-L", "rigger-data"]));
    let foreign = disk("foreign", Some(&["mkfs.ext4", "-q", "-L", "scratch"]));
    let other = disk("other", Some(&["mkfs.ext2", "-q", "-L", "rigger-data"]));
    let check = |device: &str| run_functions(&format!("data_filesystem {device}"));
    assert_eq!(check(&empty), Ok("empty\n".into()));
    assert_eq!(check(&ours), Ok("ours\n".into()));
    for refused in [&foreign, &other] {
        let error = check(refused).unwrap_err();
        assert!(error.contains("which rigger did not make"), "{error}");
    }
    let error = check(&dir.path().join("missing").display().to_string()).unwrap_err();
    assert!(error.contains("cannot tell what"), "{error}");
}

/// Root never loads a file a service user can write: no line of any script sources a file
/// (`.`/`source`) except in a loader that `runuser` started as the service's user.
#[test]
fn root_sources_no_file_a_service_user_can_write() {
    for (label, script) in scripts() {
        for line in script.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            assert!(
                !matches!(words.first(), Some(&".") | Some(&"source")),
                "{label}: root sources a file: {line}"
            );
            if line.contains("set -a") {
                // Only inside a loader, started by runuser as the service's user.
                let loader = line.find("/bin/sh -c 'set -a");
                let runuser = line.find("runuser -u ");
                assert!(
                    matches!((runuser, loader), (Some(r), Some(l)) if r < l),
                    "{label}: an environment file is loaded as root: {line}"
                );
            }
        }
    }
    let (_, worker) = scripts().into_iter().find(|(l, _)| l == "worker").unwrap();
    assert!(
        worker.contains("runuser -u www-data -- env HOME=/var/lib/rigger/home/www-data PYTHONUNBUFFERED=1 /bin/sh -c 'set -a && . \"$1\" && set +a && shift && exec \"$@\"' rigger-env /etc/rigger/app/app.env /srv/shop/venv/bin/celery"),
        "the worker's probe loads app.env as www-data"
    );
    // The app's environment file is root's: the app reads it, cannot rewrite it.
    assert!(worker.contains("put /etc/rigger/app/app.env 0640 root:www-data secret "));
}

/// The release is unpacked as root's files and its requirements installed by the build user,
/// from a file inside the release, into a venv that is root's afterwards.
#[test]
fn releases_are_unpacked_as_roots_and_built_unprivileged() {
    let (_, web) = scripts().into_iter().find(|(l, _)| l == "web").unwrap();
    assert!(web.contains("tar -xzf \"$tarball\" -C \"$4\" --no-same-owner --no-same-permissions"));
    assert!(web.contains("\"$(realpath -e -- \"$4\")\"/*) ;;"));
    for builder_step in [
        "runuser -u \"$7\" -- env HOME=\"$home\" python3 -m venv \"$5\"",
        "runuser -u \"$7\" -- env HOME=\"$home\" \"$5/bin/pip\" install",
    ] {
        assert!(web.contains(builder_step), "{builder_step}");
    }
    let pip_lines: Vec<&str> = web
        .lines()
        .filter(|l| l.contains("bin/pip") || l.contains("-m venv"))
        .collect();
    assert!(!pip_lines.is_empty());
    for line in pip_lines {
        assert!(
            line.contains("runuser -u \"$7\""),
            "pip or venv as root: {line}"
        );
    }
    assert!(web.contains("chown -R 0:0 \"$5\""));
    assert!(web.contains(
        "install_release \"$bucket\" releases/r1.tar.gz \"$REGION\" /srv/shop/app /srv/shop/venv requirements.txt rigger-build"
    ));
}

/// Servers install a release from the wheels it carries, never from PyPI: every pip line of
/// every app server's script says `--no-index --find-links` the release's wheels, and a
/// release without wheels is refused with a clear error.
#[test]
fn app_servers_install_the_release_from_its_wheels_only() {
    let all: Vec<(String, String)> = scripts()
        .into_iter()
        .chain(first_release_scripts())
        .collect();
    for (label, script) in &all {
        let installs: Vec<&str> = script
            .lines()
            .filter(|l| l.contains("pip\" install") || l.contains("pip install"))
            .collect();
        if !label.starts_with("web") && !label.starts_with("worker") {
            assert!(installs.is_empty(), "{label} installs Python packages");
            continue;
        }
        assert_eq!(installs.len(), 1, "{label}: {installs:?}");
        assert!(
            installs[0].contains(&format!(
                "--no-index --find-links \"$4/{}\"",
                rigger_aws::releases::WHEELS
            )),
            "{label}: {}",
            installs[0]
        );
    }
    assert!(
        rigger_aws::userdata::INSTALL_RELEASE_FUNCTION
            .contains("carries no wheels (built by a rigger from before releases did)")
    );
}

/// Every web server gathers the static files of its release, as the app's user with the
/// app's environment file loaded by that user, after unpacking it and before its app and
/// nginx start; workers do not.
#[test]
fn web_servers_collect_static_files_before_serving() {
    let all: Vec<(String, String)> = scripts()
        .into_iter()
        .chain(first_release_scripts())
        .collect();
    for (label, script) in &all {
        let collect = script
            .lines()
            .position(|l| l.contains("manage.py collectstatic --noinput"));
        if !label.starts_with("web") {
            assert!(collect.is_none(), "{label} collects static files");
            continue;
        }
        let lines: Vec<&str> = script.lines().collect();
        let collect = collect.unwrap_or_else(|| panic!("{label}: no collectstatic"));
        let line = lines[collect];
        assert!(
            line.starts_with("(cd /srv/shop/app && runuser -u www-data -- env HOME=/var/lib/rigger/home/www-data PYTHONUNBUFFERED=1 /bin/sh -c 'set -a && . \"$1\" && set +a && shift && exec \"$@\"' rigger-env /etc/rigger/app/app.env /srv/shop/venv/bin/python manage.py collectstatic --noinput"),
            "{label}: {line}"
        );
        let at = |needle: &str| {
            lines
                .iter()
                .position(|l| l.starts_with(needle))
                .unwrap_or_else(|| panic!("{label}: no {needle}"))
        };
        let static_dir = at("install -d -m 0755 -o www-data -g www-data /srv/shop/static");
        assert!(
            at("install_release ") < static_dir && static_dir < collect,
            "{label}"
        );
        assert!(
            collect < at("systemctl enable --now rigger-gunicorn.service"),
            "{label}"
        );
        assert!(
            collect < at("systemctl enable --now rigger-nginx.service"),
            "{label}"
        );
    }
}

/// Runs `install_packages PACKAGES` with stand-in `dpkg-query` (the packages in `installed`
/// are installed) and `apt-get` (records its calls in `apt.log`); returns (success, the
/// apt-get calls).
fn run_install_packages(installed: &[&str], packages: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = dir.path().join("apt.log");
    let write = |name: &str, text: String| {
        use std::os::unix::fs::PermissionsExt as _;
        let path = bin.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    write(
        "dpkg-query",
        format!(
            "#!/bin/bash\ncase \" {} \" in *\" ${{@: -1}} \"*) printf 'install ok installed';; *) exit 1;; esac\n",
            installed.join(" ")
        ),
    );
    write(
        "apt-get",
        format!("#!/bin/bash\necho \"apt-get $*\" >>{}\n", log.display()),
    );
    // policy-rc.d is written where the function writes it: run in a root of our own.
    let function = rigger_aws::userdata::INSTALL_PACKAGES_FUNCTION.replace(
        "/usr/sbin/policy-rc.d",
        &dir.path().join("policy-rc.d").display().to_string(),
    );
    let script = format!(
        "set -euo pipefail\nlog() {{ printf 'rigger: %s\\n' \"$*\" >&2; }}\nPATH={}:$PATH\n{function}\ninstall_packages {packages}\n",
        bin.display()
    );
    let output = Command::new("bash").args(["-c", &script]).output().unwrap();
    (
        output.status.success(),
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}

#[test]
fn a_baked_image_boots_without_the_package_archive() {
    let (ok, calls) = run_install_packages(&["nginx", "pgbouncer"], "nginx pgbouncer");
    assert!(ok);
    assert_eq!(calls, "", "apt-get ran although every package is installed");
    let (ok, calls) = run_install_packages(&["nginx"], "nginx pgbouncer stunnel4");
    assert!(ok);
    assert_eq!(
        calls,
        "apt-get update -q\napt-get install -y -q --no-install-recommends pgbouncer stunnel4\n",
        "only the missing packages are installed"
    );
}

/// Runs `root_disk` with a stand-in `findmnt` printing `source` for `/` and a stand-in
/// `lsblk` printing `parent` as its PKNAME.
fn root_disk_with(source: &str, parent: &str) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| {
        use std::os::unix::fs::PermissionsExt as _;
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    write("findmnt", format!("#!/bin/sh\necho '{source}'\n"));
    write(
        "lsblk",
        format!(
            "#!/bin/sh\n[ -b \"$3\" ] || {{ echo \"lsblk: $3: not a block device\" >&2; exit 32; }}\necho '{parent}'\n"
        ),
    );
    run_functions(&format!("PATH={}:$PATH; root_disk", dir.path().display()))
}

/// A block device of this machine, to stand for the root filesystem's.
fn some_block_device() -> String {
    use std::os::unix::fs::FileTypeExt as _;
    std::fs::read_dir("/dev")
        .unwrap()
        .flatten()
        .find(|e| e.file_type().is_ok_and(|t| t.is_block_device()))
        .map(|e| e.path().display().to_string())
        .expect("a block device in /dev")
}

#[test]
fn the_root_disk_is_found_on_partitions_whole_disks_and_containers() {
    let device = some_block_device();
    // A partition: its disk.
    assert_eq!(
        root_disk_with(&device, "nvme0n1").unwrap().trim(),
        "/dev/nvme0n1"
    );
    // A filesystem on a whole disk: the disk itself (was `/dev/`).
    assert_eq!(root_disk_with(&device, "").unwrap().trim(), device);
    // A container's overlay (the lab's machines): no disk, and no failure (lsblk failed with
    // 32 there, ending the boot script).
    assert_eq!(root_disk_with("overlay", "").unwrap().trim(), "");
}

/// The boot script's `read_secrets` against a stand-in `aws` that answers as the CLI's JSON
/// does (names that are missing listed as `InvalidParameters`): values with any text, read in
/// batches of 10, and a missing parameter fails naming it.
#[test]
fn secrets_are_read_in_batches_whatever_they_hold() {
    use std::os::unix::fs::PermissionsExt as _;
    let (_, web) = &scripts()[0];
    let start = web.find("\nread_secrets() {").expect("read_secrets");
    let end = start + web[start..].find("\n}\n").unwrap() + 3;
    let function = &web[start..end];
    let dir = tempfile::tempdir().unwrap();
    // Answers every name it is asked for with a value of its own, except `missing`; logs how
    // many names each call asked for.
    let aws = dir.path().join("aws");
    std::fs::write(
        &aws,
        r#"#!/usr/bin/python3
import json, sys
names = sys.argv[sys.argv.index("--names") + 1:sys.argv.index("--output")]
with open(sys.argv[0] + ".calls", "a") as calls:
    calls.write(f"{len(names)}\n")
values = {name: f"{name} & \\1 \"quoted\" $HOME `x`\n  second line\ttab" for name in names if not name.endswith("missing")}
print(json.dumps({"Parameters": [{"Name": n, "Value": v} for n, v in values.items()],
                  "InvalidParameters": [n for n in names if n.endswith("missing")]}))
"#,
    )
    .unwrap();
    std::fs::set_permissions(&aws, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = |arguments: &str| {
        let script = format!(
            "set -euo pipefail\nlog() {{ printf 'rigger: %s\\n' \"$*\" >&2; }}\n\
             die() {{ log \"error: $*\"; exit 1; }}\nPARAMETERS=/shop/prod/ REGION=eu-west-1\n\
             {function}\ndeclare -A SECRETS=()\nread_secrets {arguments}\n\
             for key in $(printf '%s\\n' \"${{!SECRETS[@]}}\" | sort); do printf '%s=[%s]\\n' \"$key\" \"${{SECRETS[$key]}}\"; done\n"
        );
        let output = std::process::Command::new("bash")
            .arg("-c")
            .arg(script)
            .env("PATH", format!("{}:/usr/bin:/bin", dir.path().display()))
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let arguments: Vec<String> = (1..=12).map(|i| format!("P{i:02} s{i:02}")).collect();
    let (ok, stdout, stderr) = run(&arguments.join(" "));
    assert!(ok, "{stderr}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("aws.calls")).unwrap(),
        "10\n2\n",
        "GetParameters takes 10 names a call"
    );
    assert_eq!(stdout.matches("=[").count(), 12, "{stdout}");
    assert!(
        stdout.contains("P07=[/shop/prod/s07 & \\1 \"quoted\" $HOME `x`\n  second line\ttab]\n"),
        "{stdout}"
    );

    let (ok, _, stderr) = run("P01 s01 P02 missing");
    assert!(!ok);
    assert!(
        stderr.contains("missing parameters: /shop/prod/missing"),
        "{stderr}"
    );
}
