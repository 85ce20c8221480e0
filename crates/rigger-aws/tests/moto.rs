//! The AWS provider against moto's server: create from empty, a second run finds nothing,
//! drift is detected and repaired, an update (desired count, instance type), `down` leaves
//! nothing tagged, and failures name the operation, the resource and what to do.

mod common;

use aws_sdk_ec2::types::{Filter, IpPermission, IpRange};
use common::{Moto, actions, config, config_text, provider, quiet, topology};
use rigger_aws::ErrorKind;

fn tagged() -> [Filter; 2] {
    [
        Filter::builder().name("tag:project").values("shop").build(),
        Filter::builder()
            .name("tag:environment")
            .values("prod")
            .build(),
    ]
}

#[tokio::test]
async fn create_from_empty_then_nothing_to_do() {
    let moto = Moto::start();
    let config = config(&config_text("", 2, "t3.small"));
    let topology = topology(&config);
    let provider = provider(&moto, config).await;

    let plan = provider.plan(common::RELEASE).await.unwrap();
    assert_eq!(
        plan.summary().create,
        topology.resources.len(),
        "{:#?}",
        actions(&plan)
    );

    let outcome = provider.up(common::RELEASE, &quiet).await.unwrap();
    assert_eq!(
        outcome.secrets_created.len(),
        rigger_aws::environment::SECRET_NAMES.len() + 2,
        "the secrets and the CA's key and certificate"
    );

    let again = provider.plan(common::RELEASE).await.unwrap();
    assert!(again.is_empty(), "second plan: {:#?}", actions(&again));
    let outcome = provider.up(common::RELEASE, &quiet).await.unwrap();
    assert!(outcome.plan.is_empty() && outcome.secrets_created.is_empty());

    let status = provider.status().await.unwrap();
    assert_eq!(status.provider, "aws");
    assert_eq!(
        status.urls,
        vec![
            "https://shop-prod-lb.us-east-1.elb.amazonaws.com/".to_owned(),
            "http://shop-prod-lb.us-east-1.elb.amazonaws.com/".to_owned(),
        ]
    );
    let groups: Vec<(String, u32, u32, u32)> = status
        .groups
        .iter()
        .map(|g| (g.name.clone(), g.min, g.desired, g.max))
        .collect();
    assert_eq!(
        groups,
        vec![("web".into(), 1, 2, 4), ("worker".into(), 1, 1, 2)]
    );
    let servers: Vec<(String, Option<String>)> = status
        .servers
        .iter()
        .map(|s| (s.id.clone(), s.load_balancer.clone()))
        .collect();
    assert_eq!(
        servers,
        vec![
            ("web-1".into(), Some("InService".into())),
            ("web-2".into(), Some("InService".into())),
            ("worker-1".into(), None),
            ("cache".into(), None),
            ("db-primary".into(), None),
            ("db-replica1".into(), None),
        ]
    );
    assert_eq!(format!("{:?}", status.phase), "Ready");
}

#[tokio::test]
async fn drift_is_detected_and_repaired() {
    let moto = Moto::start();
    let config = config(&config_text("", 2, "t3.small"));
    let provider = provider(&moto, config).await;
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let ec2 = &provider.clients.ec2;

    // A rule added by hand: PostgreSQL open to a network.
    let groups = ec2
        .describe_security_groups()
        .filters(
            Filter::builder()
                .name("group-name")
                .values("shop-prod-db-sg")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let db_sg = groups.security_groups()[0].group_id().unwrap().to_owned();
    ec2.authorize_security_group_ingress()
        .group_id(&db_sg)
        .ip_permissions(
            IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(5432)
                .to_port(5432)
                .ip_ranges(IpRange::builder().cidr_ip("198.51.100.0/24").build())
                .build(),
        )
        .send()
        .await
        .unwrap();
    // The health check changed by hand.
    provider
        .clients
        .elb
        .configure_health_check()
        .load_balancer_name("shop-prod-lb")
        .health_check(
            aws_sdk_elasticloadbalancing::types::HealthCheck::builder()
                .target("TCP:80")
                .interval(30)
                .timeout(5)
                .healthy_threshold(2)
                .unhealthy_threshold(2)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    // A server gone.
    let cache = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("tag:Name")
                .values("shop-prod-cache")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let cache = cache.reservations()[0].instances()[0]
        .instance_id()
        .unwrap()
        .to_owned();
    ec2.terminate_instances()
        .instance_ids(&cache)
        .send()
        .await
        .unwrap();

    let plan = provider.plan(common::RELEASE).await.unwrap();
    assert_eq!(
        actions(&plan),
        vec![
            "Update security_group shop-prod-db-sg: ingress",
            "Update load_balancer shop-prod-lb: health_check, health_check_timing",
            "Create server shop-prod-cache: data_volume, image, instance_profile, instance_type, roles, security_groups",
        ]
    );
    let ingress = plan
        .steps
        .iter()
        .find(|s| s.id.name == "shop-prod-db-sg")
        .unwrap();
    let change = &ingress.changes[0];
    assert!(format!("{:?}", change.old).contains("tcp/5432 from 198.51.100.0/24"));
    assert!(!format!("{:?}", change.new).contains("198.51.100.0/24"));

    provider.up(common::RELEASE, &quiet).await.unwrap();
    let again = provider.plan(common::RELEASE).await.unwrap();
    assert!(again.is_empty(), "after repair: {:#?}", actions(&again));

    // Only the timing changed by hand (an interval of an older rigger, say): drift too.
    provider
        .clients
        .elb
        .configure_health_check()
        .load_balancer_name("shop-prod-lb")
        .health_check(
            aws_sdk_elasticloadbalancing::types::HealthCheck::builder()
                .target("HTTPS:443/healthcheck.html")
                .interval(15)
                .timeout(5)
                .healthy_threshold(3)
                .unhealthy_threshold(2)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    timing_drift_is_planned_and_repaired(&provider).await;
}

/// The plan has the load balancer's health check timing to change, and nothing else; `up`
/// repairs it.
async fn timing_drift_is_planned_and_repaired(provider: &rigger_aws::Provider) {
    let plan = provider.plan(common::RELEASE).await.unwrap();
    assert_eq!(
        actions(&plan),
        vec!["Update load_balancer shop-prod-lb: health_check_timing"]
    );
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let again = provider.plan(common::RELEASE).await.unwrap();
    assert!(again.is_empty(), "after repair: {:#?}", actions(&again));
}

#[tokio::test]
async fn desired_count_and_instance_type_are_updated() {
    let moto = Moto::start();
    let first = config(&config_text("", 2, "t3.small"));
    let provider = provider(&moto, first.clone()).await;
    provider.up(common::RELEASE, &quiet).await.unwrap();

    // The group's count is scaling's: `desired` alone changes nothing once the group exists,
    // a `min` above it does.
    let second = config(
        &config_text("", 3, "t3.medium")
            .replace("min = 1\nmax = 4", "min = 3\nmax = 4")
            .replace(
                "replicas = 1",
                "replicas = 1\ninstance_type = \"m5.xlarge\"",
            ),
    );
    let provider = common::provider(&moto, second).await;
    let plan = provider.plan(common::RELEASE).await.unwrap();
    assert_eq!(
        actions(&plan),
        vec![
            "Update launch_template shop-prod-web-r1: instance_type",
            "Update auto_scaling_group shop-prod-web: desired, min",
            "Create group_server shop-prod-web[3]: launch_template",
            "Update server shop-prod-db-primary: instance_type",
            "Update server shop-prod-db-replica1: instance_type",
        ]
    );
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let again = provider.plan(common::RELEASE).await.unwrap();
    assert!(again.is_empty(), "after the update: {:#?}", actions(&again));

    let group = provider
        .clients
        .autoscaling
        .describe_auto_scaling_groups()
        .auto_scaling_group_names("shop-prod-web")
        .send()
        .await
        .unwrap();
    let group = &group.auto_scaling_groups()[0];
    assert_eq!(group.desired_capacity(), Some(3));
    assert_eq!(group.instances().len(), 3);
    let primary = provider
        .clients
        .ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("tag:Name")
                .values("shop-prod-db-primary")
                .build(),
        )
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("running")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let primary = &primary.reservations()[0].instances()[0];
    assert_eq!(primary.instance_type().unwrap().as_str(), "m5.xlarge");
    assert_eq!(
        primary.private_ip_address(),
        Some("172.31.15.243"),
        "the address stays"
    );
}

#[tokio::test]
async fn down_leaves_nothing_tagged() {
    let moto = Moto::start();
    let config = config(&config_text("", 2, "t3.small"));
    let topology = topology(&config);
    let provider = provider(&moto, config).await;
    provider.up(common::RELEASE, &quiet).await.unwrap();
    // Something of someone else's in the same VPC, which `down` must not touch.
    let ec2 = &provider.clients.ec2;
    ec2.create_security_group()
        .group_name("not-riggers")
        .description("hand-made")
        .send()
        .await
        .unwrap();

    let plan = provider.down(&quiet).await.unwrap();
    assert_eq!(plan.summary().delete, topology.resources.len());

    let c = &provider.clients;
    let groups = ec2
        .describe_security_groups()
        .set_filters(Some(tagged().to_vec()))
        .send()
        .await
        .unwrap();
    assert!(
        groups.security_groups().is_empty(),
        "{:?}",
        groups.security_groups()
    );
    let instances = ec2
        .describe_instances()
        .set_filters(Some(tagged().to_vec()))
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .values("stopped")
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(
        instances
            .reservations()
            .iter()
            .all(|r| r.instances().is_empty())
    );
    let volumes = ec2
        .describe_volumes()
        .set_filters(Some(tagged().to_vec()))
        .send()
        .await
        .unwrap();
    assert!(volumes.volumes().is_empty(), "{:?}", volumes.volumes());
    let interfaces = ec2
        .describe_network_interfaces()
        .set_filters(Some(tagged().to_vec()))
        .send()
        .await
        .unwrap();
    assert!(interfaces.network_interfaces().is_empty());
    let templates = ec2
        .describe_launch_templates()
        .set_filters(Some(tagged().to_vec()))
        .send()
        .await
        .unwrap();
    assert!(templates.launch_templates().is_empty());
    let asgs = c
        .autoscaling
        .describe_auto_scaling_groups()
        .send()
        .await
        .unwrap();
    assert!(asgs.auto_scaling_groups().is_empty());
    let lbs = c.elb.describe_load_balancers().send().await.unwrap();
    assert!(lbs.load_balancer_descriptions().is_empty());
    let parameters = c
        .ssm
        .get_parameters_by_path()
        .path("/shop/prod/")
        .recursive(true)
        .send()
        .await
        .unwrap();
    assert!(
        parameters.parameters().is_empty(),
        "{:?}",
        parameters.parameters()
    );
    let profiles = c.iam.list_instance_profiles().send().await.unwrap();
    assert!(profiles.instance_profiles().is_empty());
    let roles = c.iam.list_roles().send().await.unwrap();
    assert!(roles.roles().is_empty(), "{:?}", roles.roles());
    let policies = c.autoscaling.describe_policies().send().await.unwrap();
    assert!(policies.scaling_policies().is_empty());
    let survivor = ec2
        .describe_security_groups()
        .filters(
            Filter::builder()
                .name("group-name")
                .values("not-riggers")
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        survivor.security_groups().len(),
        1,
        "down touched a group it does not own"
    );

    let after = provider.plan(common::RELEASE).await.unwrap();
    assert_eq!(after.summary().create, topology.resources.len());
}

#[tokio::test]
async fn a_missing_image_is_reported_with_what_to_do() {
    let moto = Moto::start();
    let text = config_text("", 2, "t3.small").replace(common::AMI, "ami-0123456789abcdef0");
    let config = config(&text);
    let provider = provider(&moto, config).await;
    let error = provider.up(common::RELEASE, &quiet).await.unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("DescribeImages ami-0123456789abcdef0"),
        "{message}"
    );
    assert!(
        message.contains("help: check `ami` in rigger.toml"),
        "{message}"
    );
    assert_eq!(error.kind(), ErrorKind::MissingImage);
}

#[tokio::test]
async fn application_load_balancer_converges() {
    let moto = Moto::start();
    let config = config(&config_text(
        "load_balancer = \"application\"",
        2,
        "t3.small",
    ));
    let provider = provider(&moto, config).await;
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let again = provider.plan(common::RELEASE).await.unwrap();
    assert!(again.is_empty(), "second plan: {:#?}", actions(&again));
    let status = provider.status().await.unwrap();
    assert!(
        status.urls[0].starts_with("https://shop-prod-lb-"),
        "{:?}",
        status.urls
    );
    let elbv2 = &provider.clients.elbv2;
    let lbs = elbv2
        .describe_load_balancers()
        .names("shop-prod-lb")
        .send()
        .await
        .unwrap();
    let lb_arn = lbs.load_balancers()[0].load_balancer_arn().unwrap();
    let listeners = elbv2
        .describe_listeners()
        .load_balancer_arn(lb_arn)
        .send()
        .await
        .unwrap();
    let https = listeners
        .listeners()
        .iter()
        .find(|l| l.port() == Some(443))
        .unwrap();
    assert_eq!(
        https.ssl_policy(),
        Some("ELBSecurityPolicy-TLS13-1-2-2021-06"),
        "TLS 1.2 and 1.3 only"
    );
    // A target group's check timing changed by hand is drift, and repaired.
    let groups = elbv2
        .describe_target_groups()
        .load_balancer_arn(lb_arn)
        .send()
        .await
        .unwrap();
    let https_group = groups
        .target_groups()
        .iter()
        .find(|g| g.port() == Some(443))
        .unwrap();
    elbv2
        .modify_target_group()
        .target_group_arn(https_group.target_group_arn().unwrap())
        .health_check_interval_seconds(30)
        .healthy_threshold_count(5)
        .send()
        .await
        .unwrap();
    timing_drift_is_planned_and_repaired(&provider).await;
    provider.down(&quiet).await.unwrap();
    let lbs = provider
        .clients
        .elbv2
        .describe_load_balancers()
        .send()
        .await
        .unwrap();
    assert!(lbs.load_balancers().is_empty());
    let groups = provider
        .clients
        .elbv2
        .describe_target_groups()
        .send()
        .await
        .unwrap();
    assert!(groups.target_groups().is_empty());
}

/// An ED25519 public key (its private half was thrown away).
const PUBLIC_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKK/sm27G6/bj9AG/ngQW2cXpMyMrTiYf52VXj7dZ3up admin@example";

/// The one running instance named `name`.
async fn instance(provider: &rigger_aws::Provider, name: &str) -> aws_sdk_ec2::types::Instance {
    let answer = provider
        .clients
        .ec2
        .describe_instances()
        .filters(Filter::builder().name("tag:Name").values(name).build())
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("running")
                .build(),
        )
        .send()
        .await
        .unwrap();
    answer.reservations()[0].instances()[0].clone()
}

#[tokio::test]
async fn imported_key_pair_and_instance_profile_are_made_used_and_deleted() {
    let moto = Moto::start();
    let config = config(&config_text(
        &format!("admin_public_key = \"{PUBLIC_KEY}\""),
        2,
        "t3.small",
    ));
    let provider = provider(&moto, config).await;
    let plan = provider.plan(common::RELEASE).await.unwrap();
    let made: Vec<String> = actions(&plan)
        .into_iter()
        .filter(|a| a.contains("key_pair shop-prod:") || a.contains("instance_profile shop-"))
        .collect();
    assert_eq!(
        made,
        vec![
            "Create key_pair shop-prod: public_key",
            "Create instance_profile shop-prod-web-instance: permissions, role",
            "Create instance_profile shop-prod-worker-instance: permissions, role",
            "Create instance_profile shop-prod-cache-instance: permissions, role",
            "Create instance_profile shop-prod-db-instance: permissions, role",
        ]
    );
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let again = provider.plan(common::RELEASE).await.unwrap();
    assert!(again.is_empty(), "second plan: {:#?}", actions(&again));

    // The key pair, tagged; servers and launch templates start with it and the profile.
    let ec2 = &provider.clients.ec2;
    let keys = ec2
        .describe_key_pairs()
        .set_filters(Some(tagged().to_vec()))
        .send()
        .await
        .unwrap();
    let names: Vec<&str> = keys
        .key_pairs()
        .iter()
        .filter_map(|k| k.key_name())
        .collect();
    assert_eq!(names, ["shop-prod"]);
    let primary = instance(&provider, "shop-prod-db-primary").await;
    assert_eq!(primary.key_name(), Some("shop-prod"));
    let profile_arn = primary
        .iam_instance_profile()
        .and_then(|p| p.arn())
        .unwrap();
    assert!(
        profile_arn.ends_with("/shop-prod-db-instance"),
        "{profile_arn}"
    );
    let template = ec2
        .describe_launch_template_versions()
        .launch_template_name("shop-prod-web-r1")
        .versions("$Default")
        .send()
        .await
        .unwrap();
    let data = template.launch_template_versions()[0]
        .launch_template_data()
        .unwrap();
    assert_eq!(data.key_name(), Some("shop-prod"));
    assert_eq!(
        data.iam_instance_profile().and_then(|p| p.name()),
        Some("shop-prod-web-instance")
    );

    // The role and profile, tagged (what they allow: each_role_reads_only_its_own...).
    let iam = &provider.clients.iam;
    let profile = iam
        .get_instance_profile()
        .instance_profile_name("shop-prod-web-instance")
        .send()
        .await
        .unwrap();
    let profile = profile.instance_profile().unwrap();
    let roles: Vec<&str> = profile.roles().iter().map(|r| r.role_name()).collect();
    assert_eq!(roles, ["shop-prod-web-instance"]);
    assert!(
        profile
            .tags()
            .iter()
            .any(|t| t.key() == "environment" && t.value() == "prod")
    );

    // A policy widened by hand is drift, and repaired.
    iam.put_role_policy()
        .role_name("shop-prod-web-instance")
        .policy_name("rigger-secrets")
        .policy_document(r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"ssm:GetParameter","Resource":"*"}]}"#)
        .send()
        .await
        .unwrap();
    let plan = provider.plan(common::RELEASE).await.unwrap();
    assert_eq!(
        actions(&plan),
        vec!["Update instance_profile shop-prod-web-instance: permissions"]
    );
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let again = provider.plan(common::RELEASE).await.unwrap();
    assert!(again.is_empty(), "after repair: {:#?}", actions(&again));

    provider.down(&quiet).await.unwrap();
    let keys = ec2
        .describe_key_pairs()
        .set_filters(Some(tagged().to_vec()))
        .send()
        .await
        .unwrap();
    assert!(keys.key_pairs().is_empty(), "{:?}", keys.key_pairs());
    let profiles = iam.list_instance_profiles().send().await.unwrap();
    assert!(
        profiles.instance_profiles().is_empty(),
        "{:?}",
        profiles.instance_profiles()
    );
    let roles = iam.list_roles().send().await.unwrap();
    assert!(
        roles
            .roles()
            .iter()
            .all(|r| !r.role_name().starts_with("shop-prod-")),
        "{:?}",
        roles.roles()
    );
}

/// Whether `pattern` (IAM's `*` wildcard) matches `text`.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            text.starts_with(head)
                && (0..=text.len() - head.len()).any(|skip| glob(tail, &text[head.len() + skip..]))
        }
    }
}

/// Each role's policy as IAM holds it, in the topology's lines.
async fn policies(
    provider: &rigger_aws::Provider,
) -> std::collections::BTreeMap<String, Vec<String>> {
    let iam = &provider.clients.iam;
    let mut out = std::collections::BTreeMap::new();
    let profiles = iam.list_instance_profiles().send().await.unwrap();
    for profile in profiles.instance_profiles() {
        for role in profile.roles() {
            let policy = iam
                .get_role_policy()
                .role_name(role.role_name())
                .policy_name("rigger-secrets")
                .send()
                .await
                .unwrap();
            // IAM answers with the document URL-encoded, as AWS does.
            out.insert(
                profile.instance_profile_name().to_owned(),
                rigger_aws::iam::permissions(policy.policy_document())
                    .into_iter()
                    .collect(),
            );
        }
    }
    out
}

/// Whether policy `lines` allow `action` on `target` (an SSM parameter path or
/// `s3:::bucket/key`).
fn allows(lines: &[String], action: &str, target: &str) -> bool {
    lines.iter().any(|line| {
        line.split_once(' ')
            .is_some_and(|(a, pattern)| a == action && glob(pattern, target))
    })
}

/// Least privilege: every server role has its own instance profile, which lets it read its
/// own secrets and objects only; no server may read the CA's key, which signs stand-alone
/// servers' certificates on this side; every server's metadata service takes tokens only,
/// one hop; the HTTPS listener refuses TLS below 1.2. A profile all roles shared (rigger
/// before per-role profiles) is deleted.
#[tokio::test]
async fn each_role_reads_only_its_own_secrets_and_no_server_the_ca_key() {
    let moto = Moto::start();
    let provider = provider(&moto, config(&config_text("", 2, "t3.small"))).await;
    let iam = &provider.clients.iam;
    let env_tags = || {
        [("project", "shop"), ("environment", "prod")].map(|(k, v)| {
            aws_sdk_iam::types::Tag::builder()
                .key(k)
                .value(v)
                .build()
                .unwrap()
        })
    };
    iam.create_role()
        .role_name("shop-prod-instance")
        .assume_role_policy_document("{}")
        .set_tags(Some(env_tags().to_vec()))
        .send()
        .await
        .unwrap();
    iam.create_instance_profile()
        .instance_profile_name("shop-prod-instance")
        .set_tags(Some(env_tags().to_vec()))
        .send()
        .await
        .unwrap();
    let plan = provider.plan(common::RELEASE).await.unwrap();
    assert!(
        actions(&plan).contains(&"Delete instance_profile shop-prod-instance: ".to_owned()),
        "{:#?}",
        actions(&plan)
    );
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let again = provider.plan(common::RELEASE).await.unwrap();
    assert!(again.is_empty(), "second plan: {:#?}", actions(&again));

    let policies = policies(&provider).await;
    assert_eq!(
        policies.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "shop-prod-cache-instance",
            "shop-prod-db-instance",
            "shop-prod-web-instance",
            "shop-prod-worker-instance",
        ],
        "the shared profile is gone"
    );
    let bucket = rigger_aws::releases::find(&provider.env, &provider.clients)
        .await
        .unwrap()
        .unwrap();
    let read = |profile: &str, name: &str| {
        allows(
            &policies[&format!("shop-prod-{profile}-instance")],
            "ssm:GetParameter",
            &format!("/shop/prod/{name}"),
        )
    };
    let object = |profile: &str, action: &str, key: &str| {
        allows(
            &policies[&format!("shop-prod-{profile}-instance")],
            action,
            &format!("s3:::{bucket}/{key}"),
        )
    };
    for profile in ["web", "worker", "cache", "db"] {
        assert!(!read(profile, "ca_key"), "{profile} may read the CA's key");
        assert!(read(profile, "ca_cert"), "{profile}");
        assert!(
            !read(profile, "deploy/lock"),
            "{profile} may read rigger's records"
        );
    }
    for profile in ["web", "worker"] {
        assert!(read(profile, "django_secret_key"), "{profile}");
        assert!(read(profile, "db_password"), "{profile}");
        assert!(read(profile, "deploy/bucket"), "{profile}");
        assert!(!read(profile, "replication_password"), "{profile}");
        assert!(!read(profile, "tls/db-primary/key"), "{profile}");
        assert!(
            object(profile, "s3:GetObject", "releases/r1.tar.gz"),
            "{profile}"
        );
        assert!(
            !object(profile, "s3:GetObject", "backups/shop.dump"),
            "{profile}"
        );
        assert!(
            !object(profile, "s3:PutObject", "releases/r2.tar.gz"),
            "{profile}"
        );
    }
    assert!(read("web", "maintenance"));
    assert!(read("db", "replication_password"));
    assert!(read("db", "tls/db-replica1/key"));
    assert!(!read("db", "django_secret_key"));
    assert!(!read("db", "redis_password"));
    assert!(!read("db", "tls/cache/key"));
    assert!(object("db", "s3:PutObject", "backups/shop.dump"));
    assert!(object("db", "s3:GetObject", "backups/shop.dump"));
    assert!(!object("db", "s3:GetObject", "releases/r1.tar.gz"));
    assert!(read("cache", "redis_password") && read("cache", "rabbitmq_password"));
    assert!(read("cache", "tls/cache/key"));
    assert!(!read("cache", "db_password") && !read("cache", "tls/db-primary/key"));

    // Each server runs with its role's profile.
    for (server, profile) in [
        ("shop-prod-cache", "cache"),
        ("shop-prod-db-primary", "db"),
        ("shop-prod-db-replica1", "db"),
    ] {
        let instance = instance(&provider, server).await;
        let arn = instance
            .iam_instance_profile()
            .and_then(|p| p.arn())
            .unwrap();
        assert!(
            arn.ends_with(&format!("/shop-prod-{profile}-instance")),
            "{arn}"
        );
        let metadata = instance.metadata_options().unwrap();
        assert_eq!(
            metadata.http_tokens(),
            Some(&aws_sdk_ec2::types::HttpTokensState::Required),
            "{server}"
        );
        assert_eq!(metadata.http_put_response_hop_limit(), Some(1), "{server}");
    }
    let ec2 = &provider.clients.ec2;
    for role in ["web", "worker"] {
        let versions = ec2
            .describe_launch_template_versions()
            .launch_template_name(format!("shop-prod-{role}-r1"))
            .versions("$Default")
            .send()
            .await
            .unwrap();
        let data = versions.launch_template_versions()[0]
            .launch_template_data()
            .unwrap();
        assert_eq!(
            data.iam_instance_profile().and_then(|p| p.name()),
            Some(format!("shop-prod-{role}-instance").as_str())
        );
        let metadata = data.metadata_options().unwrap();
        assert_eq!(
            metadata.http_tokens(),
            Some(&aws_sdk_ec2::types::LaunchTemplateHttpTokensState::Required),
            "{role}"
        );
        assert_eq!(metadata.http_put_response_hop_limit(), Some(1), "{role}");
    }

    // The stand-alone servers' certificates, signed by rigger, verify against the CA for
    // their names and addresses.
    let ssm = &provider.clients.ssm;
    let value = |name: &'static str| async move {
        ssm.get_parameter()
            .name(format!("/shop/prod/{name}"))
            .with_decryption(true)
            .send()
            .await
            .unwrap()
            .parameter()
            .unwrap()
            .value()
            .unwrap()
            .to_owned()
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), value("ca_cert").await).unwrap();
    for (id, name) in [
        ("db-primary", "tls/db-primary/cert"),
        ("db-replica1", "tls/db-replica1/cert"),
        ("cache", "tls/cache/cert"),
    ] {
        let address = instance(&provider, &format!("shop-prod-{id}"))
            .await
            .private_ip_address()
            .unwrap()
            .to_owned();
        std::fs::write(dir.path().join("server.crt"), value(name).await).unwrap();
        let verified = std::process::Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(dir.path().join("ca.crt"))
            .args(["-verify_hostname", id, "-verify_ip", &address])
            .arg(dir.path().join("server.crt"))
            .output()
            .unwrap();
        assert!(
            verified.status.success(),
            "{id}: {}",
            String::from_utf8_lossy(&verified.stderr)
        );
    }
    assert!(value("tls/db-primary/key").await.contains("PRIVATE KEY"));

    // The HTTPS listener's TLS policy; one changed by hand is drift, and repaired.
    let elb = &provider.clients.elb;
    let tls_policy = || async {
        let lbs = elb
            .describe_load_balancers()
            .load_balancer_names("shop-prod-lb")
            .send()
            .await
            .unwrap();
        let names: Vec<String> = lbs.load_balancer_descriptions()[0]
            .listener_descriptions()
            .iter()
            .find(|l| l.listener().unwrap().load_balancer_port() == 443)
            .unwrap()
            .policy_names()
            .to_vec();
        let policies = elb
            .describe_load_balancer_policies()
            .load_balancer_name("shop-prod-lb")
            .set_policy_names(Some(names))
            .send()
            .await
            .unwrap();
        policies
            .policy_descriptions()
            .iter()
            .flat_map(|p| p.policy_attribute_descriptions())
            .find(|a| a.attribute_name() == Some("Reference-Security-Policy"))
            .and_then(|a| a.attribute_value())
            .map(str::to_owned)
    };
    assert_eq!(
        tls_policy().await.as_deref(),
        Some("ELBSecurityPolicy-TLS-1-2-2017-01")
    );
    elb.set_load_balancer_policies_of_listener()
        .load_balancer_name("shop-prod-lb")
        .load_balancer_port(443)
        .set_policy_names(Some(Vec::new()))
        .send()
        .await
        .unwrap();
    let plan = provider.plan(common::RELEASE).await.unwrap();
    assert_eq!(
        actions(&plan),
        vec!["Update load_balancer shop-prod-lb: tls_policy"]
    );
    provider.up(common::RELEASE, &quiet).await.unwrap();
    assert_eq!(
        tls_policy().await.as_deref(),
        Some("ELBSecurityPolicy-TLS-1-2-2017-01")
    );
}

#[tokio::test]
async fn a_named_key_pair_and_instance_profile_are_used_and_never_deleted() {
    let moto = Moto::start();
    let config = config(&config_text(
        "key_pair = \"admin\"\ninstance_profile = \"servers\"",
        2,
        "t3.small",
    ));
    let provider = provider(&moto, config).await;
    // Made by hand, without rigger's tags.
    provider
        .clients
        .ec2
        .create_key_pair()
        .key_name("admin")
        .send()
        .await
        .unwrap();
    provider
        .clients
        .iam
        .create_instance_profile()
        .instance_profile_name("servers")
        .send()
        .await
        .unwrap();

    provider.up(common::RELEASE, &quiet).await.unwrap();
    let again = provider.plan(common::RELEASE).await.unwrap();
    assert!(again.is_empty(), "second plan: {:#?}", actions(&again));
    let cache = instance(&provider, "shop-prod-cache").await;
    assert_eq!(cache.key_name(), Some("admin"));
    assert!(
        cache
            .iam_instance_profile()
            .and_then(|p| p.arn())
            .unwrap()
            .ends_with("/servers")
    );

    let plan = provider.down(&quiet).await.unwrap();
    assert!(
        plan.steps
            .iter()
            .all(|s| !matches!(s.id.kind, rigger_topology::ResourceKind::KeyPair)),
        "{:#?}",
        actions(&plan)
    );
    let keys = provider
        .clients
        .ec2
        .describe_key_pairs()
        .send()
        .await
        .unwrap();
    let names: Vec<&str> = keys
        .key_pairs()
        .iter()
        .filter_map(|k| k.key_name())
        .collect();
    assert_eq!(names, ["admin"], "down deleted a key pair it does not own");
    let profiles = provider
        .clients
        .iam
        .list_instance_profiles()
        .send()
        .await
        .unwrap();
    let names: Vec<&str> = profiles
        .instance_profiles()
        .iter()
        .map(|p| p.instance_profile_name())
        .collect();
    assert_eq!(names, ["servers"], "down deleted a profile it does not own");
}

#[tokio::test]
async fn scaling_owns_the_desired_count_and_the_cpu_target_is_set() {
    let moto = Moto::start();
    let first = config(&config_text("", 2, "t3.small"));
    let provider = provider(&moto, first).await;
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let autoscaling = &provider.clients.autoscaling;

    // The policy (here: by hand) grows the web group within min..max: nothing to undo.
    autoscaling
        .set_desired_capacity()
        .auto_scaling_group_name("shop-prod-web")
        .desired_capacity(3)
        .honor_cooldown(false)
        .send()
        .await
        .unwrap();
    let plan = provider.plan(common::RELEASE).await.unwrap();
    assert!(
        plan.is_empty(),
        "scaled by the policy: {:#?}",
        actions(&plan)
    );

    // A new target, and a max below the group's count.
    let second = config(
        &config_text("cpu_target = 70", 2, "t3.small")
            .replace("min = 1\nmax = 4", "min = 1\nmax = 2"),
    );
    let provider = common::provider(&moto, second).await;
    let plan = provider.plan(common::RELEASE).await.unwrap();
    assert_eq!(
        actions(&plan),
        vec![
            "Update auto_scaling_group shop-prod-web: cpu_target, desired, max",
            "Update auto_scaling_group shop-prod-worker: cpu_target",
            "Delete group_server shop-prod-web[3]: launch_template",
        ]
    );
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let again = provider.plan(common::RELEASE).await.unwrap();
    assert!(again.is_empty(), "after the update: {:#?}", actions(&again));
    let policies = autoscaling.describe_policies().send().await.unwrap();
    let mut targets: Vec<(String, Option<f64>)> = policies
        .scaling_policies()
        .iter()
        .map(|p| {
            (
                p.policy_name().unwrap_or_default().to_owned(),
                p.target_tracking_configuration()
                    .and_then(|t| t.target_value()),
            )
        })
        .collect();
    targets.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        targets,
        vec![
            ("shop-prod-web-cpu".to_owned(), Some(70.0)),
            ("shop-prod-worker-cpu".to_owned(), Some(70.0)),
        ]
    );
}

#[tokio::test]
async fn legacy_launch_configurations_are_made_replaced_and_deleted() {
    let moto = Moto::start();
    let first = config(&config_text("launch = \"configuration\"", 2, "t3.small"));
    let topology = topology(&first);
    let provider = provider(&moto, first).await;
    let plan = provider.plan(common::RELEASE).await.unwrap();
    assert_eq!(plan.summary().create, topology.resources.len());
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let again = provider.plan(common::RELEASE).await.unwrap();
    assert!(again.is_empty(), "second plan: {:#?}", actions(&again));

    let autoscaling = &provider.clients.autoscaling;
    let names = |answer: &aws_sdk_autoscaling::operation::describe_launch_configurations::DescribeLaunchConfigurationsOutput| {
        let mut names: Vec<String> = answer
            .launch_configurations()
            .iter()
            .filter_map(|lc| lc.launch_configuration_name().map(str::to_owned))
            .collect();
        names.sort();
        names
    };
    let before = names(
        &autoscaling
            .describe_launch_configurations()
            .send()
            .await
            .unwrap(),
    );
    assert_eq!(before.len(), 2, "{before:?}");
    for (name, role) in before.iter().zip(["web", "worker"]) {
        // <project>-<env>-<role>-<UTC timestamp>-<release>
        let timestamp = name
            .strip_prefix(&format!("shop-prod-{role}-"))
            .and_then(|rest| rest.strip_suffix("-r1"))
            .unwrap_or_else(|| panic!("{name}"));
        assert_eq!(timestamp.len(), 16, "{name}");
        assert!(
            timestamp.starts_with("20") && timestamp.ends_with('Z'),
            "{name}"
        );
    }
    let group = |answer: &aws_sdk_autoscaling::operation::describe_auto_scaling_groups::DescribeAutoScalingGroupsOutput| {
        answer.auto_scaling_groups()[0]
            .launch_configuration_name()
            .map(str::to_owned)
    };
    let web = autoscaling
        .describe_auto_scaling_groups()
        .auto_scaling_group_names("shop-prod-web")
        .send()
        .await
        .unwrap();
    assert_eq!(group(&web).as_ref(), Some(&before[0]));

    // A launch configuration cannot change: a new instance type is a new one.
    let second = config(&config_text("launch = \"configuration\"", 2, "t3.medium"));
    let provider = common::provider(&moto, second).await;
    let plan = provider.plan(common::RELEASE).await.unwrap();
    assert_eq!(
        actions(&plan),
        vec!["Replace launch_configuration shop-prod-web-r1: instance_type"]
    );
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let again = provider.plan(common::RELEASE).await.unwrap();
    assert!(again.is_empty(), "after the update: {:#?}", actions(&again));
    let after = names(
        &autoscaling
            .describe_launch_configurations()
            .send()
            .await
            .unwrap(),
    );
    assert_eq!(after.len(), 2, "the old one is deleted: {after:?}");
    assert_ne!(after[0], before[0]);
    assert_eq!(after[1], before[1], "the worker's is untouched");
    let web = autoscaling
        .describe_auto_scaling_groups()
        .auto_scaling_group_names("shop-prod-web")
        .send()
        .await
        .unwrap();
    assert_eq!(group(&web).as_ref(), Some(&after[0]));

    provider.down(&quiet).await.unwrap();
    let left = names(
        &autoscaling
            .describe_launch_configurations()
            .send()
            .await
            .unwrap(),
    );
    assert!(left.is_empty(), "{left:?}");
    let asgs = autoscaling
        .describe_auto_scaling_groups()
        .send()
        .await
        .unwrap();
    assert!(asgs.auto_scaling_groups().is_empty());
}

#[tokio::test]
async fn a_chosen_vpc_and_subnets_are_used() {
    let moto = Moto::start();
    let probe = provider(&moto, config(&config_text("", 2, "t3.small"))).await;
    let ec2 = &probe.clients.ec2;
    let vpc = ec2
        .create_vpc()
        .cidr_block("10.1.0.0/16")
        .send()
        .await
        .unwrap();
    let vpc = vpc.vpc().unwrap().vpc_id().unwrap().to_owned();
    let mut subnets = Vec::new();
    for (zone, cidr) in [
        ("us-east-1a", "10.1.0.0/20"),
        ("us-east-1b", "10.1.16.0/20"),
    ] {
        let subnet = ec2
            .create_subnet()
            .vpc_id(&vpc)
            .availability_zone(zone)
            .cidr_block(cidr)
            .send()
            .await
            .unwrap();
        subnets.push(subnet.subnet().unwrap().subnet_id().unwrap().to_owned());
    }
    let network = format!(
        "vpc = \"{vpc}\"\nsubnets = [\"{}\", \"{}\"]",
        subnets[0], subnets[1]
    );
    let provider = provider(&moto, config(&config_text(&network, 2, "t3.small"))).await;
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let again = provider.plan(common::RELEASE).await.unwrap();
    assert!(again.is_empty(), "second plan: {:#?}", actions(&again));
    let primary = instance(&provider, "shop-prod-db-primary").await;
    assert_eq!(primary.subnet_id(), Some(subnets[0].as_str()));
    assert_eq!(primary.private_ip_address(), Some("10.1.15.243"));
    let replica = instance(&provider, "shop-prod-db-replica1").await;
    assert_eq!(
        replica.subnet_id(),
        Some(subnets[1].as_str()),
        "replica N in zone N"
    );
    let groups = provider
        .clients
        .ec2
        .describe_security_groups()
        .set_filters(Some(tagged().to_vec()))
        .send()
        .await
        .unwrap();
    assert!(
        groups
            .security_groups()
            .iter()
            .all(|g| g.vpc_id() == Some(vpc.as_str()))
    );
    provider.down(&quiet).await.unwrap();
    let instances = provider
        .clients
        .ec2
        .describe_instances()
        .set_filters(Some(tagged().to_vec()))
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(
        instances
            .reservations()
            .iter()
            .all(|r| r.instances().is_empty())
    );

    // A subnet of another VPC is refused before anything is made, naming what to do.
    let default_subnet = probe
        .clients
        .ec2
        .describe_subnets()
        .filters(
            Filter::builder()
                .name("default-for-az")
                .values("true")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let foreign = default_subnet.subnets()[0].subnet_id().unwrap().to_owned();
    let wrong = format!("vpc = \"{vpc}\"\nsubnets = [\"{foreign}\"]");
    let provider = common::provider(&moto, config(&config_text(&wrong, 2, "t3.small"))).await;
    let error = provider
        .plan(common::RELEASE)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(&format!("DescribeSubnets {foreign}"))
            && error.contains(&format!("not to {vpc}")),
        "{error}"
    );
}
