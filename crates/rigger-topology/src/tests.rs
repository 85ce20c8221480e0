use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use rigger_config::{
    AwsConfig, CacheConfig, Cidr, Config, DatabaseConfig, Environment, GroupSizing,
    LoadBalancerKind, LocalConfig, Project, ProviderConfig,
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

fn aws() -> ProviderConfig {
    ProviderConfig::Aws(AwsConfig {
        region: "us-east-1".into(),
        ami: "ami-0123456789abcdef0".into(),
        load_balancer: LoadBalancerKind::Classic,
        certificate: Some("arn:aws:acm:us-east-1:123456789012:certificate/abc".into()),
        admin_cidrs: vec!["203.0.113.0/24".parse::<Cidr>().unwrap()],
    })
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
