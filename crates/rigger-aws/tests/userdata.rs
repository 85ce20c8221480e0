//! The user-data every kind of server boots with: valid bash (`bash -n`), clean under
//! shellcheck, and free of secret values.

mod common;

use std::process::Command;

use rigger_aws::environment::{AwsEnvironment, Cidr, Network, Subnet};
use rigger_recipes::Role;

fn network() -> Network {
    Network {
        vpc_id: "vpc-1".into(),
        vpc_cidr: Cidr::parse("172.31.0.0/16").unwrap(),
        subnets: ["a", "b"]
            .iter()
            .enumerate()
            .map(|(i, zone)| Subnet {
                id: format!("subnet-{i}"),
                zone: format!("us-east-1{zone}"),
                cidr: Cidr::parse(&format!("172.31.{}.0/20", i * 16)).unwrap(),
            })
            .collect(),
    }
}

fn env() -> AwsEnvironment {
    let text = common::config_text("", 2, "t3.small");
    AwsEnvironment::new(common::config(&text), "prod").unwrap()
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
            rigger_aws::userdata::script(&env, &ctx).unwrap(),
        ));
    }
    for server in env.stand_alone_servers(&network) {
        let ctx = env.context(&network, &server.roles, Some(&server), "r1");
        out.push((
            server.id.clone(),
            rigger_aws::userdata::script(&env, &ctx).unwrap(),
        ));
    }
    out
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
    for (label, script) in scripts() {
        check_tool("bash", &["-n"], &label, &script);
    }
}

#[test]
fn user_data_passes_shellcheck() {
    for (label, script) in scripts() {
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
        assert!(script.contains("SECRETS[RIGGER_SECRET_DB_PASSWORD_]=$(parameter db_password)"));
        // The CA key is used to sign the server's certificate, then removed.
        assert!(
            script.contains("rm -f /etc/rigger/pki/private/ca.key"),
            "{label}"
        );
    }
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
        rigger_aws::userdata::user_data(&env, &ctx).unwrap();
    }
    for role in [Role::Web, Role::Worker] {
        let ctx = env.context(&network, &[role], None, "r1");
        rigger_aws::userdata::user_data(&env, &ctx).unwrap();
    }
}
