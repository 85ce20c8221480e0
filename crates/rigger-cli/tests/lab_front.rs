//! The lab's AWS front end to end: inside a lab machine, Debian 12's AWS CLI (which ignores
//! every endpoint variable) reaches the emulator at the real AWS host names, as rigger's boot
//! scripts call it: the lab's resolver sends `*.amazonaws.com` to the front, which proves the
//! names with a certificate of the lab's CA (trusted by the machine from its first boot) and
//! forwards to the emulator; the credentials are the instance profile's, from the metadata
//! service. A name outside AWS and the lab does not resolve, at once. From this machine, the
//! lab's endpoint is the same front in plain HTTP. `rigger lab down` leaves nothing.
//!
//! Needs root, the lab image (`rigger lab image`) and moto (scripts/moto.sh); fails, never
//! skips, when one is missing.

mod hermetic;
use std::process::Command;
use std::time::{Duration, Instant};

use rigger_aws::lab::sdk::ec2;

mod lab_support;
use lab_support::*;

const ROLE: &str = "lab-front-role";
const PROFILE: &str = "lab-front-profile";
const BUCKET: &str = "lab-front-releases";
const KEY: &str = "releases/initial/notes.txt";
/// Larger than the AWS CLI's multipart threshold (8 MiB): fetched in ranged parts at once.
const LARGE_KEY: &str = "releases/initial/large.bin";
const LARGE_SIZE: usize = 20 * 1024 * 1024 + 3;
const PARAMETER: &str = "/lab-front/secret";

#[test]
#[ignore = "end to end: scripts/test runs it after the other tests (-- --ignored)"]
fn machines_call_the_aws_api_at_its_real_names_through_the_labs_front() {
    let (lab, started) = start_lab();
    let Started {
        endpoint,
        ami,
        namespace,
        ..
    } = &started;
    // The endpoint is the front, not the emulator's own port.
    let settings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lab.state.path().join("lab.json")).unwrap()).unwrap();
    assert_eq!(settings["endpoint"], endpoint.as_str());
    assert_ne!(settings["emulator"], endpoint.as_str(), "{settings:#}");

    let keys = tempfile::tempdir().unwrap();
    let (key, public_key) = make_key(keys.path());

    let notes = "the lab's front carried this\n";
    let large: Vec<u8> = (0..LARGE_SIZE)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let large_file = keys.path().join("large.bin");
    std::fs::write(&large_file, &large).unwrap();
    let secret = "s3cr3t value / with spaces";

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let clients = connect(&runtime, endpoint);
    let instance_id = runtime.block_on(async {
        // Through the lab's endpoint (the front, plain HTTP on this machine's loopback).
        clients
            .s3
            .create_bucket()
            .bucket(BUCKET)
            .send()
            .await
            .expect("CreateBucket");
        for (object, body) in [(KEY, notes.as_bytes().to_vec()), (LARGE_KEY, large.clone())] {
            clients
                .s3
                .put_object()
                .bucket(BUCKET)
                .key(object)
                .body(body.into())
                .send()
                .await
                .expect("PutObject");
        }
        clients
            .ssm
            .put_parameter()
            .name(PARAMETER)
            .r#type("SecureString".into())
            .value(secret)
            .send()
            .await
            .expect("PutParameter");
        import_key(&clients, "lab-front", &public_key).await;
        make_instance_profile(&clients, ROLE, PROFILE).await;
        let subnet = default_subnet(&clients).await;
        let launched = clients
            .ec2
            .run_instances()
            .image_id(ami)
            .instance_type(ec2::types::InstanceType::T3Micro)
            .min_count(1)
            .max_count(1)
            .key_name("lab-front")
            .subnet_id(subnet)
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
    let upper = lab
        .state
        .path()
        .join("machines")
        .join(&instance_id)
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

    // The machine trusts the lab's CA, in its own layer; the CA's key stays in the state
    // directory, readable by root alone.
    let ca = std::fs::read_to_string(lab.state.path().join("pki/ca.crt")).unwrap();
    assert_eq!(
        std::fs::read_to_string(upper.join("usr/local/share/ca-certificates/rigger-lab-ca.crt"))
            .unwrap(),
        ca
    );
    for bundle in [
        "etc/ssl/certs/ca-certificates.crt",
        "usr/lib/python3/dist-packages/awscli/botocore/cacert.pem",
    ] {
        let text = std::fs::read_to_string(upper.join(bundle)).unwrap();
        assert!(text.contains(ca.trim()), "{bundle} trusts the lab's CA");
    }
    let ca_key = std::fs::metadata(lab.state.path().join("pki/ca.key")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&ca_key.permissions()) & 0o777,
        0o600
    );
    let private_keys = Command::new("grep")
        .args(["-rl", "PRIVATE KEY"])
        .arg(&upper)
        .output()
        .unwrap();
    let private_keys = String::from_utf8_lossy(&private_keys.stdout);
    assert!(
        private_keys
            .lines()
            .all(|f| f.contains("/etc/ssh/ssh_host_")),
        "no lab key in the machine: {private_keys}"
    );

    // The resolver: AWS names are the front, the machine's EC2 name is its address, anything
    // else does not exist, at once.
    let front = ssh.ok("getent ahostsv4 ssm.us-east-1.amazonaws.com | awk 'NR == 1 { print $1 }'");
    assert_eq!(front, "172.31.0.3");
    assert_eq!(
        ssh.ok(&format!(
            "getent ahostsv4 {BUCKET}.s3.us-east-1.amazonaws.com | awk 'NR == 1 {{ print $1 }}'"
        )),
        front
    );
    let own_name = format!("ip-{}.ec2.internal", address.replace('.', "-"));
    assert_eq!(
        ssh.ok(&format!(
            "getent ahostsv4 {own_name} | awk 'NR == 1 {{ print $1 }}'"
        )),
        address
    );
    let started_lookup = Instant::now();
    let elsewhere = ssh.run("getent hosts pypi.org");
    let lookup = started_lookup.elapsed();
    assert_eq!(
        elsewhere.status.code(),
        Some(2),
        "pypi.org does not exist in the lab: {}",
        text(&elsewhere)
    );
    // The SSH round trip included; a resolver that did not answer would take 5 s per try.
    assert!(
        lookup < Duration::from_secs(2),
        "the lookup took {lookup:?}"
    );

    // Debian's archive is the lab's package mirror, at the front's address: the archive's
    // trees go through (to the real archive), nothing else does.
    assert_eq!(
        ssh.ok("getent ahostsv4 deb.debian.org | awk 'NR == 1 { print $1 }'"),
        front
    );
    let status = |args: &str| ssh.ok(&format!("curl -s -o /dev/null -w '%{{http_code}}' {args}"));
    assert_eq!(
        status("http://deb.debian.org/debian/dists/bookworm/InRelease"),
        "200"
    );
    assert_eq!(
        status("-I http://security.debian.org/debian-security/dists/bookworm-security/InRelease"),
        "200"
    );
    assert_eq!(status("http://deb.debian.org/other/"), "403");
    assert_eq!(
        status("http://deb.debian.org/debian/../etc/passwd --path-as-is"),
        "403"
    );
    assert_eq!(
        status("-H 'Host: example.org' http://172.31.0.3/debian/dists/bookworm/InRelease"),
        "403"
    );
    assert_eq!(
        status("-X POST http://deb.debian.org/debian/dists/bookworm/InRelease"),
        "405"
    );
    assert_eq!(status("-x http://172.31.0.3:80 http://example.org/"), "403");

    // The AWS CLI as rigger's boot scripts run it: no endpoint option, the instance profile's
    // credentials from the metadata service.
    let caller =
        ssh.ok("sudo aws sts get-caller-identity --region us-east-1 --query Arn --output text");
    assert!(
        caller.contains(&format!("assumed-role/{ROLE}/{instance_id}")),
        "{caller}"
    );
    let fetched = ssh.ok(&format!(
        "sudo aws s3 cp --region us-east-1 --only-show-errors s3://{BUCKET}/{KEY} -"
    ));
    assert_eq!(fetched, notes.trim_end());
    let digest = ssh.ok(&format!(
        "sudo aws s3 cp --region us-east-1 --only-show-errors s3://{BUCKET}/{LARGE_KEY} - | sha256sum"
    ));
    let expected = Command::new("sha256sum").arg(&large_file).output().unwrap();
    let expected = String::from_utf8_lossy(&expected.stdout);
    assert_eq!(
        digest.split_whitespace().next(),
        expected.split_whitespace().next(),
        "the large object came through intact"
    );
    let value = ssh.ok(&format!(
        "sudo aws ssm get-parameter --region us-east-1 --with-decryption --name {PARAMETER} \
         --query Parameter.Value --output text"
    ));
    assert_eq!(value, secret);
    // Written from inside, read from this machine through the endpoint.
    ssh.ok(&format!(
        "echo from-inside | sudo aws s3 cp --region us-east-1 --only-show-errors - s3://{BUCKET}/inside.txt"
    ));
    let inside = runtime.block_on(async {
        clients
            .s3
            .get_object()
            .bucket(BUCKET)
            .key("inside.txt")
            .send()
            .await
            .expect("GetObject")
            .body
            .collect()
            .await
            .unwrap()
            .into_bytes()
    });
    assert_eq!(&inside[..], b"from-inside\n");

    let down = lab.rigger(&["down"]);
    assert!(down.status.success(), "rigger lab down: {}", text(&down));
    assert_nothing_left(&lab, &started);
}
