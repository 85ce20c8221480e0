use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use rigger_config::{
    AwsConfig, CacheConfig, Cidr, Config, DatabaseConfig, Environment, GroupSizing, KeyPair,
    LaunchKind, LoadBalancerKind, LocalConfig, Project, ProviderConfig,
};

use super::*;

fn sizing(min: u32, desired: u32, max: u32) -> GroupSizing {
    GroupSizing {
        min,
        max,
        desired,
        instance_type: "t3.small".into(),
        volume_size: 20,
    }
}

pub(crate) fn config(provider: ProviderConfig, replicas: u32, shared_with_queue: bool) -> Config {
    let env = Environment {
        name: "prod".into(),
        provider,
        web: sizing(2, 2, 4),
        worker: sizing(1, 1, 2),
        database: DatabaseConfig {
            replicas,
            instance_type: "m5.large".into(),
            volume_size: 50,
        },
        cache: CacheConfig {
            shared_with_queue,
            instance_type: "t3.medium".into(),
            volume_size: 20,
        },
        hsts: None,
    };
    Config {
        project: Project {
            name: "surveys".into(),
            app_path: PathBuf::from("app"),
            wsgi_module: "surveys.wsgi:application".into(),
            celery_app: "surveys".into(),
            domains: vec!["surveys.example.com".into()],
            health_check_path: "/healthcheck.html".into(),
            requirements: PathBuf::from("requirements.txt"),
        },
        environments: BTreeMap::from([("prod".to_owned(), env)]),
    }
}

fn aws_config() -> AwsConfig {
    AwsConfig {
        region: "us-east-1".into(),
        ami: "ami-0123456789abcdef0".into(),
        load_balancer: LoadBalancerKind::Classic,
        certificate: Some("arn:aws:acm:us-east-1:123456789012:certificate/abc".into()),
        admin_cidrs: vec!["203.0.113.0/24".parse::<Cidr>().unwrap()],
        vpc: None,
        subnets: vec![],
        key_pair: Some(KeyPair::Import(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKK".into(),
        )),
        instance_profile: None,
        cpu_target: 50,
        launch: LaunchKind::Template,
        deploy_user: "admin".into(),
        ssh_identity: None,
        bastion: None,
        ssh_port: 22,
    }
}

fn aws() -> ProviderConfig {
    ProviderConfig::Aws(aws_config())
}

fn local() -> ProviderConfig {
    ProviderConfig::Local(LocalConfig {
        http_port: 8080,
        https_port: 8443,
        addresses: "127.77.0.0/16".parse().unwrap(),
    })
}

/// One line per resource: id, tags and dependencies, then its attributes indented.
fn describe(topology: &Topology) -> String {
    let mut out = String::new();
    for resource in &topology.resources {
        out.push_str(&format!("{}\n", resource.id));
        for (name, attribute) in &resource.attributes {
            let marker = if attribute.on_change == OnChange::Replace {
                " (replace)"
            } else {
                ""
            };
            out.push_str(&format!("    {name} = {}{marker}\n", attribute.value));
        }
        for dependency in &resource.depends_on {
            out.push_str(&format!("    after {dependency}\n"));
        }
    }
    out
}

#[test]
fn aws_environment_has_the_seed_architecture() {
    let topology = desired(&config(aws(), 1, true), "prod", "r1").unwrap();
    insta::assert_snapshot!(describe(&topology));
}

/// The security groups open the ports the recipes' servers listen on: Redis and RabbitMQ
/// only on their TLS ports.
#[test]
fn security_groups_open_the_recipes_tls_ports() {
    let recipes = rigger_recipes::Ports::default();
    assert_eq!(port::REDIS_TLS, recipes.redis_tls);
    assert_eq!(port::AMQPS, recipes.amqps);
    assert_eq!(port::POSTGRES, recipes.postgres);
    let topology = desired(&config(aws(), 1, false), "prod", "r1").unwrap();
    let ingress = |name: &str| {
        let group = topology
            .resources
            .iter()
            .find(|r| r.id.kind == ResourceKind::SecurityGroup && r.id.name == name)
            .unwrap();
        match &group.attributes["ingress"].value {
            Value::Set(rules) => rules.iter().cloned().collect::<Vec<_>>(),
            other => panic!("{other}"),
        }
    };
    assert_eq!(
        ingress("surveys-prod-cache-sg"),
        [
            "tcp/6380 from sg:surveys-prod-web-sg",
            "tcp/6380 from sg:surveys-prod-worker-sg"
        ]
    );
    assert_eq!(
        ingress("surveys-prod-queue-sg"),
        [
            "tcp/5671 from sg:surveys-prod-web-sg",
            "tcp/5671 from sg:surveys-prod-worker-sg"
        ]
    );
}

#[test]
fn local_environment_leaves_out_machine_attributes() {
    let topology = desired(&config(local(), 1, true), "prod", "r1").unwrap();
    for resource in &topology.resources {
        assert!(
            !resource.attributes.contains_key("instance_type"),
            "{}",
            resource.id
        );
        assert!(
            !resource.attributes.contains_key("image"),
            "{}",
            resource.id
        );
    }
    let lb = topology
        .resources
        .iter()
        .find(|r| r.id.kind == ResourceKind::LoadBalancer)
        .unwrap();
    assert_eq!(
        lb.attributes["listeners"].value,
        Value::List(vec!["8080->80 HTTP".into(), "8443->443 HTTPS".into()])
    );
}

#[test]
fn nothing_but_the_load_balancer_is_open_to_the_world() {
    let topology = desired(&config(aws(), 2, false), "prod", "r1").unwrap();
    let mut open = Vec::new();
    for resource in &topology.resources {
        if let Some(Attribute {
            value: Value::Set(rules),
            ..
        }) = resource.attributes.get("ingress")
        {
            open.extend(
                rules
                    .iter()
                    .filter(|r| r.ends_with("from 0.0.0.0/0"))
                    .map(|r| format!("{} {r}", resource.id.name)),
            );
        }
    }
    assert_eq!(
        open,
        [
            "surveys-prod-lb-sg tcp/443 from 0.0.0.0/0",
            "surveys-prod-lb-sg tcp/80 from 0.0.0.0/0"
        ]
    );
}

#[test]
fn every_resource_has_the_four_tags_and_comes_after_its_dependencies() {
    let topology = desired(&config(aws(), 3, false), "prod", "r7").unwrap();
    let mut seen = BTreeSet::new();
    for resource in &topology.resources {
        let keys: Vec<_> = resource.tags.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["environment", "project", "release", "role"],
            "{}",
            resource.id
        );
        assert_eq!(resource.tags["release"], "r7");
        for dependency in &resource.depends_on {
            assert!(
                seen.contains(dependency),
                "{} depends on {dependency}, which comes later or is missing",
                resource.id
            );
        }
        assert!(
            seen.insert(resource.id.clone()),
            "{} appears twice",
            resource.id
        );
    }
}

#[test]
fn split_cache_and_replica_count_shape_the_servers() {
    let topology = desired(&config(aws(), 3, false), "prod", "r1").unwrap();
    let servers: Vec<_> = topology
        .resources
        .iter()
        .filter(|r| r.id.kind == ResourceKind::Server)
        .map(|r| r.id.name.as_str())
        .collect();
    assert_eq!(
        servers,
        [
            "surveys-prod-cache",
            "surveys-prod-queue",
            "surveys-prod-db-primary",
            "surveys-prod-db-replica1",
            "surveys-prod-db-replica2",
            "surveys-prod-db-replica3"
        ]
    );
}

#[test]
fn unknown_environment_names_the_known_ones() {
    let error = desired(&config(aws(), 1, true), "staging", "r1").unwrap_err();
    assert_eq!(
        error.to_string(),
        "no environment `staging` in the configuration (it has: prod)"
    );
}

#[test]
fn legacy_launch_configurations_are_replaced_on_any_change() {
    let provider = ProviderConfig::Aws(AwsConfig {
        launch: LaunchKind::Configuration,
        key_pair: Some(KeyPair::Existing("admin".into())),
        instance_profile: Some("servers".into()),
        cpu_target: 70,
        ..aws_config()
    });
    let topology = desired(&config(provider, 1, true), "prod", "r1").unwrap();
    let find = |kind: ResourceKind| {
        topology
            .resources
            .iter()
            .filter(move |r| r.id.kind == kind)
            .collect::<Vec<_>>()
    };
    assert!(find(ResourceKind::LaunchTemplate).is_empty());
    assert!(
        find(ResourceKind::KeyPair).is_empty(),
        "an existing key pair is not rigger's"
    );
    assert!(
        find(ResourceKind::InstanceProfile).is_empty(),
        "a named profile is not rigger's"
    );
    let configuration = find(ResourceKind::LaunchConfiguration)[0];
    assert_eq!(configuration.id.name, "surveys-prod-web-r1");
    assert!(
        configuration
            .attributes
            .values()
            .all(|a| a.on_change == OnChange::Replace)
    );
    assert_eq!(
        configuration.attributes["key_pair"].value,
        Value::from("admin")
    );
    assert_eq!(
        configuration.attributes["instance_profile"].value,
        Value::from("servers")
    );
    let group = find(ResourceKind::AutoScalingGroup)[0];
    assert_eq!(
        group.attributes["launch_configuration"].value,
        Value::from("surveys-prod-web-r1")
    );
    assert_eq!(group.attributes["cpu_target"].value, Value::Integer(70));
    assert!(!group.attributes.contains_key("launch_template"));
}

#[test]
fn launch_configuration_names_carry_a_timestamp_on_aws() {
    let names = Names::new("surveys", "prod");
    let aws = names.launch_configuration_on_aws(Role::Worker, "20261127T211120Z", "2026-abc");
    assert_eq!(aws, "surveys-prod-worker-20261127T211120Z-2026-abc");
    assert_eq!(
        names.launch_configuration_from_aws(&aws).as_deref(),
        Some("surveys-prod-worker-2026-abc")
    );
    // Another environment whose name starts like this one's, and names that are not rigger's.
    let other = Names::new("surveys", "prod-web").launch_configuration_on_aws(
        Role::Worker,
        "20261127T211120Z",
        "r1",
    );
    assert_eq!(names.launch_configuration_from_aws(&other), None);
    assert_eq!(
        names.launch_configuration_from_aws("surveys-prod-web-r1"),
        None
    );
    assert_eq!(
        names.launch_configuration_from_aws("surveys-prod-web-20261127T211120Z-"),
        None
    );
}

#[test]
fn scaled_counts_replace_desired_within_min_and_max() {
    let config = config(aws(), 1, true);
    let count = |scaled: ScaledCounts, role: &str| {
        let topology = desired_scaled(&config, "prod", "r1", scaled).unwrap();
        let group = topology
            .resources
            .iter()
            .find(|r| {
                r.id == ResourceId::new(
                    ResourceKind::AutoScalingGroup,
                    format!("surveys-prod-{role}"),
                )
            })
            .unwrap();
        let servers = topology
            .resources
            .iter()
            .filter(|r| {
                r.id.kind == ResourceKind::GroupServer
                    && r.id.name.starts_with(&format!("surveys-prod-{role}["))
            })
            .count();
        (group.attributes["desired"].value.clone(), servers)
    };
    // web: min 2, desired 2, max 4; worker: min 1, desired 1, max 2.
    assert_eq!(
        count(ScaledCounts::default(), "web"),
        (Value::Integer(2), 2)
    );
    let scaled = ScaledCounts {
        web: Some(3),
        worker: Some(7),
    };
    assert_eq!(count(scaled, "web"), (Value::Integer(3), 3));
    assert_eq!(
        count(scaled, "worker"),
        (Value::Integer(2), 2),
        "brought down to max"
    );
    let below = ScaledCounts {
        web: Some(0),
        worker: None,
    };
    assert_eq!(
        count(below, "web"),
        (Value::Integer(2), 2),
        "brought up to min"
    );
}

#[test]
fn each_server_role_has_a_profile_allowing_only_its_own_secrets() {
    let permissions = |shared_with_queue: bool| -> BTreeMap<String, BTreeSet<String>> {
        desired(&config(aws(), 1, shared_with_queue), "prod", "r1")
            .unwrap()
            .resources
            .into_iter()
            .filter(|r| r.id.kind == ResourceKind::InstanceProfile)
            .map(|r| match &r.attributes["permissions"].value {
                Value::Set(lines) => (r.id.name.clone(), lines.clone()),
                other => panic!("{other}"),
            })
            .collect()
    };
    let separate = permissions(false);
    assert_eq!(
        separate.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "surveys-prod-cache-instance",
            "surveys-prod-db-instance",
            "surveys-prod-queue-instance",
            "surveys-prod-web-instance",
            "surveys-prod-worker-instance",
        ]
    );
    let allows = |profile: &str, needle: &str| {
        separate[&format!("surveys-prod-{profile}-instance")]
            .iter()
            .any(|line| line.contains(needle))
    };
    for (profile, needles) in [
        ("web", &["replication_password", "backups/", "tls/"][..]),
        (
            "worker",
            &["replication_password", "backups/", "maintenance"][..],
        ),
        (
            "db",
            &["django_secret_key", "redis_password", "releases/"][..],
        ),
        (
            "cache",
            &["rabbitmq_password", "db_password", "deploy/bucket"][..],
        ),
        ("queue", &["redis_password", "tls/cache/"][..]),
    ] {
        for needle in needles {
            assert!(!allows(profile, needle), "{profile} may read {needle}");
        }
    }
    assert!(allows("web", "/surveys/prod/django_secret_key"));
    assert!(allows("db", "/surveys/prod/replication_password"));
    assert!(allows(
        "db",
        "s3:PutObject s3:::surveys-prod-releases-*/backups/*"
    ));
    for (name, lines) in &separate {
        for line in lines {
            assert!(!line.contains("ca_key"), "{name}: {line}");
            assert!(!line.ends_with("/prod/*"), "{name}: {line}");
        }
    }
    // Each server may write two parameters, both its own: its SSH host keys and its boot
    // report.
    for (name, lines) in &separate {
        let writes: Vec<&String> = lines
            .iter()
            .filter(|line| line.starts_with("ssm:Put"))
            .collect();
        assert_eq!(
            writes,
            [
                "ssm:PutParameter /surveys/prod/boot/${ec2:InstanceID}",
                "ssm:PutParameter /surveys/prod/hostkeys/${ec2:InstanceID}"
            ],
            "{name}"
        );
    }
    // A cache server that is also the queue reads both their secrets.
    let shared = permissions(true);
    assert!(!shared.contains_key("surveys-prod-queue-instance"));
    assert!(
        shared["surveys-prod-cache-instance"]
            .contains("ssm:GetParameter /surveys/prod/rabbitmq_password")
    );
}
