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
            "Update load_balancer shop-prod-lb: health_check",
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
        .send()
        .await
        .unwrap();
    assert!(parameters.parameters().is_empty());
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
            "Create instance_profile shop-prod-instance: permissions, role",
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
        profile_arn.ends_with("/shop-prod-instance"),
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
        Some("shop-prod-instance")
    );

    // The role and profile, tagged, allowing the environment's secrets only.
    let iam = &provider.clients.iam;
    let profile = iam
        .get_instance_profile()
        .instance_profile_name("shop-prod-instance")
        .send()
        .await
        .unwrap();
    let profile = profile.instance_profile().unwrap();
    let roles: Vec<&str> = profile.roles().iter().map(|r| r.role_name()).collect();
    assert_eq!(roles, ["shop-prod-instance"]);
    assert!(
        profile
            .tags()
            .iter()
            .any(|t| t.key() == "environment" && t.value() == "prod")
    );
    let policy = iam
        .get_role_policy()
        .role_name("shop-prod-instance")
        .policy_name("rigger-secrets")
        .send()
        .await
        .unwrap();
    // IAM answers with the document URL-encoded, as AWS does.
    let allowed = rigger_aws::iam::permissions(policy.policy_document());
    assert_eq!(
        allowed.into_iter().collect::<Vec<_>>(),
        [
            "kms:Decrypt via ssm",
            "s3:GetObject s3:::shop-prod-releases-*/*",
            "s3:PutObject s3:::shop-prod-releases-*/backups/*",
            "ssm:GetParameter /shop/prod/*",
            "ssm:GetParameters /shop/prod/*"
        ]
    );

    // A policy widened by hand is drift, and repaired.
    iam.put_role_policy()
        .role_name("shop-prod-instance")
        .policy_name("rigger-secrets")
        .policy_document(r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"ssm:GetParameter","Resource":"*"}]}"#)
        .send()
        .await
        .unwrap();
    let plan = provider.plan(common::RELEASE).await.unwrap();
    assert_eq!(
        actions(&plan),
        vec!["Update instance_profile shop-prod-instance: permissions"]
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
            .all(|r| r.role_name() != "shop-prod-instance"),
        "{:?}",
        roles.roles()
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
