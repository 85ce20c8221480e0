//! Valid configs: defaults, the full example in docs/config.md, the starter file, and `load`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use rigger_config::{
    AwsConfig, Bastion, CacheConfig, Cidr, Config, DatabaseConfig, Environment, GroupSizing, Hsts,
    KeyPair, LaunchKind, LoadBalancerKind, LoadError, LocalConfig, Project, ProviderConfig,
    ProviderKind, load, parse, starter,
};

fn cidr(a: [u8; 4], prefix: u8) -> Cidr {
    Cidr {
        addr: Ipv4Addr::from(a),
        prefix,
    }
}

fn sizing(min: u32, max: u32, desired: u32, instance_type: &str, volume_size: u32) -> GroupSizing {
    GroupSizing {
        min,
        max,
        desired,
        instance_type: instance_type.to_owned(),
        volume_size,
    }
}

fn parse_ok(source: &str) -> Config {
    parse(source, "rigger.toml").unwrap_or_else(|d| panic!("{d}"))
}

const MINIMAL: &str = r#"
[project]
name = "surveys"
app_path = "app"
wsgi_module = "surveys.wsgi:application"
celery_app = "surveys"
domains = ["surveys.example.com"]

[environments.local]
provider = "local"
"#;

#[test]
fn minimal_config_takes_every_default() {
    let expected = Config {
        project: Project {
            name: "surveys".into(),
            app_path: PathBuf::from("app"),
            wsgi_module: "surveys.wsgi:application".into(),
            celery_app: "surveys".into(),
            domains: vec!["surveys.example.com".into()],
            health_check_path: "/healthcheck.html".into(),
            requirements: PathBuf::from("requirements.txt"),
        },
        environments: BTreeMap::from([(
            "local".to_owned(),
            Environment {
                name: "local".into(),
                provider: ProviderConfig::Local(LocalConfig {
                    http_port: 8080,
                    https_port: 8443,
                    addresses: cidr([127, 77, 0, 0], 16),
                }),
                web: sizing(2, 4, 2, "t3.small", 20),
                worker: sizing(1, 2, 1, "t3.small", 20),
                database: DatabaseConfig {
                    replicas: 1,
                    instance_type: "m5.large".into(),
                    volume_size: 50,
                },
                cache: CacheConfig {
                    shared_with_queue: true,
                    instance_type: "t3.medium".into(),
                    volume_size: 20,
                },
                hsts: None,
            },
        )]),
    };
    assert_eq!(parse_ok(MINIMAL), expected);
}

#[test]
fn minimal_aws_environment_takes_defaults() {
    let source = format!(
        "{MINIMAL}\n[environments.production]\nprovider = \"aws\"\nregion = \"us-east-1\"\n\
         ami = \"ami-12345678\"\ncertificate = \"arn:aws:iam::123456789012:server-certificate/x\"\n"
    );
    let config = parse_ok(&source);
    let production = &config.environments["production"];
    assert_eq!(production.provider_kind(), ProviderKind::Aws);
    assert_eq!(
        production.provider,
        ProviderConfig::Aws(AwsConfig {
            region: "us-east-1".into(),
            ami: "ami-12345678".into(),
            load_balancer: LoadBalancerKind::Classic,
            certificate: Some("arn:aws:iam::123456789012:server-certificate/x".into()),
            admin_cidrs: vec![],
            vpc: None,
            subnets: vec![],
            key_pair: None,
            instance_profile: None,
            cpu_target: 50,
            launch: LaunchKind::Template,
            deploy_user: "admin".into(),
            ssh_identity: None,
            bastion: None,
            ssh_port: 22,
        })
    );
}

#[test]
fn admin_public_key_is_imported_without_its_comment() {
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKK/sm27G6/bj9AG/ngQW2cXpMyMrTiYf52VXj7dZ3up";
    let source = format!(
        "{MINIMAL}\n[environments.production]\nprovider = \"aws\"\nregion = \"us-east-1\"\n\
         ami = \"ami-12345678\"\ncertificate = \"arn:aws:iam::123456789012:server-certificate/x\"\n\
         admin_public_key = \"{key} admin@example\"\nlaunch = \"configuration\"\n"
    );
    let config = parse_ok(&source);
    let ProviderConfig::Aws(aws) = &config.environments["production"].provider else {
        panic!("an aws environment");
    };
    assert_eq!(aws.key_pair, Some(KeyPair::Import(key.to_owned())));
    assert_eq!(aws.launch, LaunchKind::Configuration);
}

#[test]
fn ssh_access_keys_are_read_as_written() {
    let source = format!(
        "{MINIMAL}\n[environments.production]\nprovider = \"aws\"\nregion = \"us-east-1\"\n\
         ami = \"ami-12345678\"\ncertificate = \"arn:aws:iam::123456789012:server-certificate/x\"\n\
         deploy_user = \"ubuntu\"\nssh_identity = \"/home/me/.ssh/prod\"\n\
         bastion = \"jump@[2001:db8::1]\"\nssh_port = 2200\n"
    );
    let config = parse_ok(&source);
    let ProviderConfig::Aws(aws) = &config.environments["production"].provider else {
        panic!("an aws environment");
    };
    assert_eq!(aws.deploy_user, "ubuntu");
    // Absolute paths are fine: whether the file exists is checked when it is used.
    assert_eq!(aws.ssh_identity, Some(PathBuf::from("/home/me/.ssh/prod")));
    assert_eq!(
        aws.bastion,
        Some(Bastion {
            user: "jump".into(),
            host: "2001:db8::1".into(),
            port: 22,
        })
    );
    assert_eq!(aws.ssh_port, 2200);
}

#[test]
fn unwritten_desired_moves_into_written_bounds() {
    let source = format!(
        "{MINIMAL}\n[environments.local.web]\nmin = 3\nmax = 6\n\
         [environments.local.worker]\nmin = 0\nmax = 1\n"
    );
    let local = &parse_ok(&source).environments["local"];
    assert_eq!((local.web.min, local.web.desired, local.web.max), (3, 3, 6));
    assert_eq!(
        (local.worker.min, local.worker.desired, local.worker.max),
        (0, 1, 1)
    );
}

#[test]
fn inline_and_dotted_tables_mean_the_same() {
    let source =
        format!("{MINIMAL}web = {{ min = 1, max = 1, desired = 1 }}\ndatabase.replicas = 0\n");
    let local = &parse_ok(&source).environments["local"];
    assert_eq!(local.web, sizing(1, 1, 1, "t3.small", 20));
    assert_eq!(local.database.replicas, 0);
}

#[test]
fn values_at_the_edge_of_their_rules_are_accepted() {
    let source = MINIMAL
        .replace("app_path = \"app\"", "app_path = \"./src/my_site-2/\"")
        .replace(
            "[environments.local]",
            "health_check_path = \"/.well-known/health_check-1.html\"\n\
             requirements = \"requirements/prod.txt\"\n\n[environments.local]",
        );
    let source = format!(
        "{source}web = {{ min = 100, max = 100 }}\ndatabase.replicas = {replicas}\n\
         [environments.production]\nprovider = \"aws\"\nregion = \"us-gov-west-1\"\n\
         ami = \"ami-12345678\"\n\
         certificate = \"arn:aws-us-gov:acm:us-gov-west-1:123456789012:certificate/0a1b-2c3d\"\n\
         key_pair = \"ops_admin-2024.old\"\n\
         admin_cidrs = [\"10.0.0.0/8\", \"10.1.0.0/16\"]\n\
         hsts_max_age = 63072000\n\
         web = {{ min = 1000, max = 1000 }}\n\
         [environments.iam]\nprovider = \"aws\"\nregion = \"eu-west-1\"\n\
         ami = \"ami-12345678\"\nhsts_max_age = 0\n\
         certificate = \"arn:aws:iam::123456789012:server-certificate/cloudfront/site+2024@x.y\"\n",
        replicas = DatabaseConfig::MAX_REPLICAS,
    );
    let config = parse_ok(&source);
    assert_eq!(config.project.app_path, PathBuf::from("./src/my_site-2/"));
    let local = &config.environments["local"];
    assert_eq!(local.web.max, GroupSizing::MAX_LOCAL_SERVERS);
    assert_eq!(local.database.replicas, 8);
    assert_eq!(
        config.environments["production"].web.max,
        GroupSizing::MAX_SERVERS
    );
    // Two years at most; 0 tells browsers to forget an earlier header.
    assert_eq!(
        config.environments["production"].hsts,
        Some(Hsts {
            max_age: Hsts::MAX_AGE_LIMIT,
            include_subdomains: false,
        })
    );
    assert_eq!(config.environments["iam"].hsts.map(|h| h.max_age), Some(0));
}

/// The ```toml block under "## Full example" in docs/config.md.
fn docs_full_example() -> String {
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/config.md"))
            .unwrap();
    let section = docs
        .split_once("\n## Full example\n")
        .expect("docs/config.md has a `## Full example` section")
        .1;
    let block = section
        .split_once("```toml\n")
        .expect("the full example is a ```toml block")
        .1;
    block
        .split_once("\n```")
        .expect("closed block")
        .0
        .to_owned()
}

#[test]
fn full_example_in_docs() {
    let config = parse_ok(&docs_full_example());
    assert_eq!(
        config.project,
        Project {
            name: "surveys".into(),
            app_path: PathBuf::from("app"),
            wsgi_module: "surveys.wsgi:application".into(),
            celery_app: "surveys".into(),
            domains: vec!["surveys.example.com".into(), ".example.org".into()],
            health_check_path: "/healthcheck.html".into(),
            requirements: PathBuf::from("requirements/production.txt"),
        }
    );
    assert_eq!(
        config.environments.keys().collect::<Vec<_>>(),
        ["local", "production"]
    );

    let local = &config.environments["local"];
    assert_eq!(
        local.provider,
        ProviderConfig::Local(LocalConfig {
            http_port: 8080,
            https_port: 8443,
            addresses: cidr([127, 77, 0, 0], 16),
        })
    );
    assert_eq!(local.web, sizing(2, 4, 2, "t3.small", 20));
    assert_eq!(local.worker, sizing(1, 2, 1, "t3.small", 20));
    assert_eq!(local.database.replicas, 1);
    assert!(local.cache.shared_with_queue);
    assert_eq!(local.hsts, None);

    let production = &config.environments["production"];
    assert_eq!(production.name, "production");
    assert_eq!(
        production.provider,
        ProviderConfig::Aws(AwsConfig {
            region: "eu-west-1".into(),
            ami: "ami-0123456789abcdef0".into(),
            load_balancer: LoadBalancerKind::Application,
            certificate: Some(
                "arn:aws:acm:eu-west-1:123456789012:certificate/\
                 0a1b2c3d-4e5f-6789-abcd-ef0123456789"
                    .into()
            ),
            admin_cidrs: vec![cidr([203, 0, 113, 0], 24), cidr([198, 51, 100, 17], 32)],
            vpc: Some("vpc-0a1b2c3d4e5f67890".into()),
            subnets: vec!["subnet-0a1b2c3d".into(), "subnet-4e5f6a7b".into()],
            key_pair: Some(KeyPair::Existing("admin".into())),
            instance_profile: Some("surveys-servers".into()),
            cpu_target: 60,
            launch: LaunchKind::Template,
            deploy_user: "deploy".into(),
            ssh_identity: Some(PathBuf::from("keys/production")),
            bastion: Some(Bastion {
                user: "ops".into(),
                host: "bastion.example.com".into(),
                port: 2222,
            }),
            ssh_port: 22,
        })
    );
    assert_eq!(
        production.hsts,
        Some(Hsts {
            max_age: 31_536_000,
            include_subdomains: true,
        })
    );
    assert_eq!(production.web, sizing(2, 8, 3, "c6i.large", 30));
    assert_eq!(production.worker, sizing(0, 4, 1, "t3.medium", 30));
    assert_eq!(
        production.database,
        DatabaseConfig {
            replicas: 2,
            instance_type: "r6i.xlarge".into(),
            volume_size: 500,
        }
    );
    assert_eq!(
        production.cache,
        CacheConfig {
            shared_with_queue: false,
            instance_type: "t3.large".into(),
            volume_size: 40,
        }
    );
}

#[test]
fn starter_parses() {
    let config = parse_ok(&starter("mysite"));
    assert_eq!(config.project.name, "mysite");
    assert_eq!(config.project.wsgi_module, "mysite.wsgi:application");
    let local = &config.environments["local"];
    assert_eq!(local.provider_kind(), ProviderKind::Local);
    assert_eq!(local.web.desired, 2);
    assert_eq!(local.worker.desired, 1);
    assert_eq!(config.environments.len(), 1);
    assert_eq!(local.hsts, None, "no HSTS pinned to a local CA by default");
}

#[test]
fn starter_aws_example_parses_when_uncommented() {
    let text = starter("my-site");
    let (head, example) = text
        .split_once("# [environments.production]")
        .expect("starter has a commented aws example");
    let uncommented: String = format!("# [environments.production]{example}")
        .lines()
        .map(|l| l.strip_prefix("# ").or(l.strip_prefix('#')).unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let config = parse_ok(&format!("{head}{uncommented}"));
    assert_eq!(config.project.celery_app, "my_site");
    assert_eq!(
        config.environments["production"].provider_kind(),
        ProviderKind::Aws
    );
    assert_eq!(
        config.environments["production"].hsts.map(|h| h.max_age),
        Some(31_536_000)
    );
}

#[test]
fn load_reads_and_names_the_file() {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/bad/unknown-key-typo.toml"
    ));
    match load(&path) {
        Err(LoadError::Invalid(d)) => {
            assert_eq!(d.file_name, path.display().to_string());
            assert_eq!(d.items.len(), 1);
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn load_reports_a_missing_file() {
    let err = load(std::path::Path::new("/nonexistent/rigger.toml")).unwrap_err();
    assert!(matches!(err, LoadError::Io { .. }));
    assert_eq!(err.to_string(), "could not read `/nonexistent/rigger.toml`");
    assert!(std::error::Error::source(&err).is_some());
}
