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

    let plan = provider.plan(&topology).await.unwrap();
    assert_eq!(
        plan.summary().create,
        topology.resources.len(),
        "{:#?}",
        actions(&plan)
    );

    let outcome = provider.up(&topology, &quiet).await.unwrap();
    assert_eq!(
        outcome.secrets_created.len(),
        7,
        "5 secrets and the CA's key and certificate"
    );

    let again = provider.plan(&topology).await.unwrap();
    assert!(again.is_empty(), "second plan: {:#?}", actions(&again));
    let outcome = provider.up(&topology, &quiet).await.unwrap();
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
            ("web[1]".into(), Some("InService".into())),
            ("web[2]".into(), Some("InService".into())),
            ("worker[1]".into(), None),
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
    let topology = topology(&config);
    let provider = provider(&moto, config).await;
    provider.up(&topology, &quiet).await.unwrap();
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

    let plan = provider.plan(&topology).await.unwrap();
    assert_eq!(
        actions(&plan),
        vec![
            "Update security_group shop-prod-db-sg: ingress",
            "Update load_balancer shop-prod-lb: health_check",
            "Create server shop-prod-cache: data_volume, image, instance_type, roles, security_groups",
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

    provider.up(&topology, &quiet).await.unwrap();
    let again = provider.plan(&topology).await.unwrap();
    assert!(again.is_empty(), "after repair: {:#?}", actions(&again));
}

#[tokio::test]
async fn desired_count_and_instance_type_are_updated() {
    let moto = Moto::start();
    let first = config(&config_text("", 2, "t3.small"));
    let provider = provider(&moto, first.clone()).await;
    provider.up(&topology(&first), &quiet).await.unwrap();

    let second = config(&config_text("", 3, "t3.medium").replace(
        "replicas = 1",
        "replicas = 1\ninstance_type = \"m5.xlarge\"",
    ));
    let topology = topology(&second);
    let provider = common::provider(&moto, second).await;
    let plan = provider.plan(&topology).await.unwrap();
    assert_eq!(
        actions(&plan),
        vec![
            "Update launch_template shop-prod-web-r1: instance_type",
            "Update auto_scaling_group shop-prod-web: desired",
            "Create group_server shop-prod-web[3]: launch_template",
            "Update server shop-prod-db-primary: instance_type",
            "Update server shop-prod-db-replica1: instance_type",
        ]
    );
    provider.up(&topology, &quiet).await.unwrap();
    let again = provider.plan(&topology).await.unwrap();
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
    provider.up(&topology, &quiet).await.unwrap();
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

    let after = provider.plan(&topology).await.unwrap();
    assert_eq!(after.summary().create, topology.resources.len());
}

#[tokio::test]
async fn a_missing_image_is_reported_with_what_to_do() {
    let moto = Moto::start();
    let text = config_text("", 2, "t3.small").replace(common::AMI, "ami-0123456789abcdef0");
    let config = config(&text);
    let topology = topology(&config);
    let provider = provider(&moto, config).await;
    let error = provider.up(&topology, &quiet).await.unwrap_err();
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
    let topology = topology(&config);
    let provider = provider(&moto, config).await;
    provider.up(&topology, &quiet).await.unwrap();
    let again = provider.plan(&topology).await.unwrap();
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
