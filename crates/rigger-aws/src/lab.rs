//! What the lab (`rigger-lab`, `rigger lab`) asks of the AWS API it stands behind: the
//! instances to make real machines of, what their metadata service answers (user-data, the
//! key pair's public key, the credentials of the instance profile's role), the default
//! VPC whose range the lab's network carries, and the load balancers (classic; application
//! with their target groups) it serves with HAProxy.
//!
//! The lab runs no AWS SDK of its own (only this crate depends on it): every call is here and
//! returns plain values, so the lab never sees an SDK type. The SDK crates are re-exported in
//! [`sdk`] for the lab's tests, which launch instances the way a user's tools would.

use base64::Engine as _;
use serde::Serialize;

use crate::client::Clients;
use crate::error::{AwsError, Context as _};

/// The SDK crates, for tests that drive the emulator the way a user's tools would.
pub mod sdk {
    pub use aws_sdk_autoscaling as autoscaling;
    pub use aws_sdk_ec2 as ec2;
    pub use aws_sdk_elasticloadbalancing as elb;
    pub use aws_sdk_elasticloadbalancingv2 as elbv2;
    pub use aws_sdk_iam as iam;
    pub use aws_sdk_sts as sts;
}

/// One EC2 instance as the lab needs it, whatever its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LabInstance {
    pub id: String,
    /// EC2's state name: `pending`, `running`, `stopping`, `stopped`, `shutting-down`,
    /// `terminated`.
    pub state: String,
    pub private_address: Option<String>,
    /// `None` when it was launched without one (moto then gives it a random 10.x address
    /// outside every VPC; AWS would use the default VPC's default subnet).
    pub subnet_id: Option<String>,
    pub private_dns_name: Option<String>,
    pub image_id: Option<String>,
    pub instance_type: Option<String>,
    pub availability_zone: Option<String>,
    pub key_name: Option<String>,
    /// `arn:aws:iam::<account>:instance-profile/<path><name>`.
    pub instance_profile_arn: Option<String>,
    pub instance_profile_id: Option<String>,
    /// The Auto Scaling group that launched it (its `aws:autoscaling:groupName` tag).
    pub autoscaling_group: Option<String>,
}

/// Temporary credentials of a role, as an instance's metadata service hands them out.
#[derive(Clone, PartialEq, Eq)]
pub struct RoleCredentials {
    pub role_name: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// Seconds since the Unix epoch.
    pub expiration: i64,
}

impl std::fmt::Debug for RoleCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret parts (they could end up in a log).
        f.debug_struct("RoleCredentials")
            .field("role_name", &self.role_name)
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

/// Every instance of the region, in every state.
pub async fn instances(clients: &Clients) -> Result<Vec<LabInstance>, AwsError> {
    let mut found = Vec::new();
    let mut pages = clients.ec2.describe_instances().into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.op("DescribeInstances", &clients.region)?;
        for reservation in page.reservations() {
            for instance in reservation.instances() {
                let Some(id) = instance.instance_id() else {
                    continue;
                };
                let profile = instance.iam_instance_profile();
                found.push(LabInstance {
                    id: id.to_owned(),
                    state: instance
                        .state()
                        .and_then(|s| s.name())
                        .map_or_else(|| "unknown".to_owned(), |n| n.as_str().to_owned()),
                    private_address: instance.private_ip_address().map(str::to_owned),
                    subnet_id: instance
                        .subnet_id()
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned),
                    private_dns_name: instance
                        .private_dns_name()
                        .filter(|n| !n.is_empty())
                        .map(str::to_owned),
                    image_id: instance.image_id().map(str::to_owned),
                    instance_type: instance.instance_type().map(|t| t.as_str().to_owned()),
                    availability_zone: instance
                        .placement()
                        .and_then(|p| p.availability_zone())
                        .map(str::to_owned),
                    key_name: instance.key_name().map(str::to_owned),
                    instance_profile_arn: profile.and_then(|p| p.arn()).map(str::to_owned),
                    instance_profile_id: profile.and_then(|p| p.id()).map(str::to_owned),
                    autoscaling_group: instance
                        .tags()
                        .iter()
                        .find(|t| t.key() == Some("aws:autoscaling:groupName"))
                        .and_then(|t| t.value())
                        .map(str::to_owned),
                });
            }
        }
    }
    Ok(found)
}

/// The instance profile (its ARN or name, as the group's launch template or launch
/// configuration names it) that group `group` launches its instances with; `None` when it
/// names none or the group is gone. AWS gives a group's instances this profile; the emulator
/// leaves them without one, so the lab's metadata service asks here.
pub async fn group_instance_profile(
    clients: &Clients,
    group: &str,
) -> Result<Option<String>, AwsError> {
    let groups = clients
        .autoscaling
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(group)
        .send()
        .await
        .op("DescribeAutoScalingGroups", group)?;
    let Some(found) = groups.auto_scaling_groups().first() else {
        return Ok(None);
    };
    if let Some(template) = found.launch_template().or_else(|| {
        found
            .mixed_instances_policy()
            .and_then(|p| p.launch_template())
            .and_then(|t| t.launch_template_specification())
    }) {
        let mut request = clients.ec2.describe_launch_template_versions();
        request = match (
            template.launch_template_id(),
            template.launch_template_name(),
        ) {
            (Some(id), _) => request.launch_template_id(id),
            (None, Some(name)) => request.launch_template_name(name),
            (None, None) => return Ok(None),
        };
        let version = template.version().unwrap_or("$Default");
        let versions = request
            .versions(version)
            .send()
            .await
            .op("DescribeLaunchTemplateVersions", group)?;
        let profile = versions
            .launch_template_versions()
            .first()
            .and_then(|v| v.launch_template_data())
            .and_then(|d| d.iam_instance_profile());
        return Ok(profile
            .and_then(|p| p.arn().or(p.name()))
            .map(str::to_owned));
    }
    let Some(configuration) = found.launch_configuration_name() else {
        return Ok(None);
    };
    let configurations = clients
        .autoscaling
        .describe_launch_configurations()
        .launch_configuration_names(configuration)
        .send()
        .await
        .op("DescribeLaunchConfigurations", configuration)?;
    Ok(configurations
        .launch_configurations()
        .first()
        .and_then(|c| c.iam_instance_profile())
        .map(str::to_owned))
}

/// The ARN and id of instance profile `name_or_arn`; `None` when it does not exist.
pub async fn instance_profile(
    clients: &Clients,
    name_or_arn: &str,
) -> Result<Option<(String, String)>, AwsError> {
    Ok(get_instance_profile(clients, name_or_arn)
        .await?
        .map(|p| (p.arn().to_owned(), p.instance_profile_id().to_owned())))
}

/// Instance profile `name_or_arn` (a name, or an ARN ending in it); `None` when it does not
/// exist.
async fn get_instance_profile(
    clients: &Clients,
    name_or_arn: &str,
) -> Result<Option<aws_sdk_iam::types::InstanceProfile>, AwsError> {
    let name = name_or_arn.rsplit('/').next().unwrap_or(name_or_arn);
    match clients
        .iam
        .get_instance_profile()
        .instance_profile_name(name)
        .send()
        .await
        .op("GetInstanceProfile", name)
    {
        Ok(answer) => Ok(answer.instance_profile),
        Err(error) if error.kind() == crate::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

/// A classic load balancer as the lab runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabLoadBalancer {
    pub name: String,
    pub dns_name: String,
    /// (load balancer port, its protocol, instance port, instance protocol).
    pub listeners: Vec<(i32, String, i32, String)>,
    /// `HTTPS:443/healthcheck.html`.
    pub health_target: String,
    pub interval_seconds: i32,
    pub timeout_seconds: i32,
    pub healthy_threshold: i32,
    pub unhealthy_threshold: i32,
    pub instances: Vec<String>,
}

/// Every classic load balancer in the region.
pub async fn classic_load_balancers(clients: &Clients) -> Result<Vec<LabLoadBalancer>, AwsError> {
    let answer = clients
        .elb
        .describe_load_balancers()
        .send()
        .await
        .op("DescribeLoadBalancers", &clients.region)?;
    Ok(answer
        .load_balancer_descriptions()
        .iter()
        .filter_map(|lb| {
            let health = lb.health_check();
            Some(LabLoadBalancer {
                name: lb.load_balancer_name()?.to_owned(),
                dns_name: lb.dns_name().unwrap_or_default().to_owned(),
                listeners: lb
                    .listener_descriptions()
                    .iter()
                    .filter_map(|d| d.listener())
                    .map(|l| {
                        (
                            l.load_balancer_port(),
                            l.protocol().to_owned(),
                            l.instance_port(),
                            l.instance_protocol().unwrap_or(l.protocol()).to_owned(),
                        )
                    })
                    .collect(),
                health_target: health.map_or("TCP:80", |h| h.target()).to_owned(),
                interval_seconds: health.map_or(30, |h| h.interval()),
                timeout_seconds: health.map_or(5, |h| h.timeout()),
                healthy_threshold: health.map_or(10, |h| h.healthy_threshold()),
                unhealthy_threshold: health.map_or(2, |h| h.unhealthy_threshold()),
                instances: lb
                    .instances()
                    .iter()
                    .filter_map(|i| i.instance_id())
                    .map(str::to_owned)
                    .collect(),
            })
        })
        .collect())
}

/// An application load balancer as the lab runs it (its target groups apart: a target group
/// may serve several listeners, or none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabApplicationLoadBalancer {
    pub name: String,
    pub arn: String,
    pub dns_name: String,
    /// (port, protocol, the target group its default action forwards to). A listener whose
    /// default action forwards nowhere (redirect, fixed response) has none.
    pub listeners: Vec<(i32, String, Option<String>)>,
}

/// A target group as the lab runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabTargetGroup {
    pub arn: String,
    pub name: String,
    /// The targets' protocol (`HTTP`, `HTTPS`).
    pub protocol: String,
    pub port: i32,
    pub health_enabled: bool,
    pub health_protocol: String,
    /// `None`: the traffic port (each target's own).
    pub health_port: Option<i32>,
    pub health_path: String,
    pub interval_seconds: i32,
    pub timeout_seconds: i32,
    pub healthy_threshold: i32,
    pub unhealthy_threshold: i32,
    /// The codes a passing check answers (`200`, `200-299`, `200,302`).
    pub matcher: String,
    /// How long a deregistered target drains (`deregistration_delay.timeout_seconds`).
    pub deregistration_delay_seconds: i32,
    /// The load balancers that forward to it.
    pub load_balancer_arns: Vec<String>,
    /// Registered targets: (instance id, port).
    pub targets: Vec<(String, i32)>,
}

/// Every application load balancer in the region, and every target group.
pub async fn application_load_balancers(
    clients: &Clients,
) -> Result<(Vec<LabApplicationLoadBalancer>, Vec<LabTargetGroup>), AwsError> {
    use aws_sdk_elasticloadbalancingv2::types::{ActionTypeEnum, LoadBalancerTypeEnum};
    let mut balancers = Vec::new();
    let mut pages = clients
        .elbv2
        .describe_load_balancers()
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.op("DescribeLoadBalancers (application)", &clients.region)?;
        for lb in page.load_balancers() {
            if lb.r#type() != Some(&LoadBalancerTypeEnum::Application) {
                continue;
            }
            let (Some(name), Some(arn)) = (lb.load_balancer_name(), lb.load_balancer_arn()) else {
                continue;
            };
            let listeners = clients
                .elbv2
                .describe_listeners()
                .load_balancer_arn(arn)
                .send()
                .await
                .op("DescribeListeners", name)?;
            let mut listeners: Vec<(i32, String, Option<String>)> = listeners
                .listeners()
                .iter()
                .filter_map(|l| {
                    let forward = l
                        .default_actions()
                        .iter()
                        .find(|a| a.r#type() == Some(&ActionTypeEnum::Forward))
                        .and_then(|a| {
                            a.target_group_arn().map(str::to_owned).or_else(|| {
                                a.forward_config()?
                                    .target_groups()
                                    .iter()
                                    .find_map(|g| g.target_group_arn())
                                    .map(str::to_owned)
                            })
                        });
                    Some((l.port()?, l.protocol()?.as_str().to_owned(), forward))
                })
                .collect();
            listeners.sort();
            balancers.push(LabApplicationLoadBalancer {
                name: name.to_owned(),
                arn: arn.to_owned(),
                dns_name: lb.dns_name().unwrap_or_default().to_owned(),
                listeners,
            });
        }
    }
    let mut groups = Vec::new();
    let mut pages = clients
        .elbv2
        .describe_target_groups()
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.op("DescribeTargetGroups", &clients.region)?;
        for group in page.target_groups() {
            let (Some(arn), Some(name)) = (group.target_group_arn(), group.target_group_name())
            else {
                continue;
            };
            let health = clients
                .elbv2
                .describe_target_health()
                .target_group_arn(arn)
                .send()
                .await
                .op("DescribeTargetHealth", name)?;
            let attributes = clients
                .elbv2
                .describe_target_group_attributes()
                .target_group_arn(arn)
                .send()
                .await
                .op("DescribeTargetGroupAttributes", name)?;
            let port = group.port().unwrap_or(80);
            let protocol = group.protocol().map_or("HTTP", |p| p.as_str()).to_owned();
            groups.push(LabTargetGroup {
                arn: arn.to_owned(),
                name: name.to_owned(),
                port,
                health_enabled: group.health_check_enabled().unwrap_or(true),
                health_protocol: group
                    .health_check_protocol()
                    .map_or(protocol.as_str(), |p| p.as_str())
                    .to_owned(),
                protocol,
                health_port: group.health_check_port().and_then(|p| p.parse().ok()),
                health_path: group.health_check_path().unwrap_or("/").to_owned(),
                interval_seconds: group.health_check_interval_seconds().unwrap_or(30),
                timeout_seconds: group.health_check_timeout_seconds().unwrap_or(5),
                healthy_threshold: group.healthy_threshold_count().unwrap_or(5),
                unhealthy_threshold: group.unhealthy_threshold_count().unwrap_or(2),
                matcher: group
                    .matcher()
                    .and_then(|m| m.http_code())
                    .unwrap_or("200")
                    .to_owned(),
                deregistration_delay_seconds: attributes
                    .attributes()
                    .iter()
                    .find(|a| a.key() == Some("deregistration_delay.timeout_seconds"))
                    .and_then(|a| a.value()?.parse().ok())
                    .unwrap_or(300),
                load_balancer_arns: group.load_balancer_arns().to_vec(),
                targets: health
                    .target_health_descriptions()
                    .iter()
                    .filter_map(|d| {
                        let target = d.target()?;
                        Some((target.id()?.to_owned(), target.port().unwrap_or(port)))
                    })
                    .collect(),
            });
        }
    }
    Ok((balancers, groups))
}

/// Marks the group instance `instance_id` unhealthy and has its group replace it (terminated
/// without shrinking the group), as Auto Scaling does with an instance that fails EC2's
/// status checks.
pub async fn replace_in_group(clients: &Clients, instance_id: &str) -> Result<(), AwsError> {
    clients
        .autoscaling
        .set_instance_health()
        .instance_id(instance_id)
        .health_status("Unhealthy")
        .send()
        .await
        .op("SetInstanceHealth", instance_id)?;
    clients
        .autoscaling
        .terminate_instance_in_auto_scaling_group()
        .instance_id(instance_id)
        .should_decrement_desired_capacity(false)
        .send()
        .await
        .op("TerminateInstanceInAutoScalingGroup", instance_id)?;
    Ok(())
}

/// An EBS volume as the lab sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabVolume {
    pub id: String,
    pub size_gib: i32,
    /// The instance it is attached to and the device name it was attached as (`/dev/sdf`).
    pub attachment: Option<(String, String)>,
}

/// Every EBS volume in the region.
pub async fn volumes(clients: &Clients) -> Result<Vec<LabVolume>, AwsError> {
    let mut found = Vec::new();
    let mut pages = clients.ec2.describe_volumes().into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.op("DescribeVolumes", &clients.region)?;
        for volume in page.volumes() {
            let Some(id) = volume.volume_id() else {
                continue;
            };
            let attachment = volume
                .attachments()
                .iter()
                .find(|a| {
                    matches!(
                        a.state().map(|s| s.as_str()),
                        Some("attached" | "attaching")
                    )
                })
                .and_then(|a| Some((a.instance_id()?.to_owned(), a.device()?.to_owned())));
            found.push(LabVolume {
                id: id.to_owned(),
                size_gib: volume.size().unwrap_or(1),
                attachment,
            });
        }
    }
    Ok(found)
}

/// The instance's user-data, decoded from base64 (still gzipped if it was sent gzipped);
/// `None` when it has none.
pub async fn user_data(clients: &Clients, instance_id: &str) -> Result<Option<Vec<u8>>, AwsError> {
    let answer = clients
        .ec2
        .describe_instance_attribute()
        .instance_id(instance_id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .op("DescribeInstanceAttribute userData", instance_id)?;
    let Some(encoded) = answer.user_data().and_then(|v| v.value()) else {
        return Ok(None);
    };
    if encoded.is_empty() {
        return Ok(None);
    }
    base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map(Some)
        .map_err(|error| {
            AwsError::precondition(
                "DescribeInstanceAttribute userData",
                instance_id,
                format!("the user-data is not base64: {error}"),
                "launch the instance with base64-encoded user-data, as EC2 requires",
            )
        })
}

/// The public keys of every key pair in the region (OpenSSH format).
pub async fn public_keys(clients: &Clients) -> Result<Vec<String>, AwsError> {
    let answer = clients
        .ec2
        .describe_key_pairs()
        .include_public_key(true)
        .send()
        .await
        .op("DescribeKeyPairs", "(all)")?;
    Ok(answer
        .key_pairs()
        .iter()
        .filter_map(|pair| pair.public_key())
        .map(|key| key.trim().to_owned())
        .collect())
}

/// The public key of key pair `name` (OpenSSH format); `None` when the key pair is gone.
pub async fn public_key(clients: &Clients, name: &str) -> Result<Option<String>, AwsError> {
    match clients
        .ec2
        .describe_key_pairs()
        .key_names(name)
        .include_public_key(true)
        .send()
        .await
        .op("DescribeKeyPairs", name)
    {
        Ok(answer) => Ok(answer
            .key_pairs()
            .first()
            .and_then(|pair| pair.public_key())
            .map(|key| key.trim().to_owned())),
        Err(error) if error.kind() == crate::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
    }
}

/// The default VPC's IPv4 range (`172.31.0.0/16` on AWS and in moto); `None` without one.
pub async fn default_vpc_cidr(clients: &Clients) -> Result<Option<String>, AwsError> {
    let answer = clients
        .ec2
        .describe_vpcs()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("is-default")
                .values("true")
                .build(),
        )
        .send()
        .await
        .op("DescribeVpcs", "is-default=true")?;
    Ok(answer
        .vpcs()
        .first()
        .and_then(|vpc| vpc.cidr_block())
        .map(str::to_owned))
}

/// Credentials of the role in instance profile `profile_arn`, for `session` (the instance
/// id), valid `seconds`: the role is assumed through STS, so the emulator knows them as that
/// role's. `None` when the profile is gone or holds no role.
pub async fn role_credentials(
    clients: &Clients,
    profile_arn: &str,
    session: &str,
    seconds: i32,
) -> Result<Option<RoleCredentials>, AwsError> {
    let profile = get_instance_profile(clients, profile_arn).await?;
    let Some(role) = profile.as_ref().and_then(|p| p.roles().first()) else {
        return Ok(None);
    };
    let assumed = clients
        .sts
        .assume_role()
        .role_arn(role.arn())
        .role_session_name(session)
        .duration_seconds(seconds)
        .send()
        .await
        .op("AssumeRole", role.arn())?;
    let Some(credentials) = assumed.credentials() else {
        return Err(AwsError::precondition(
            "AssumeRole",
            role.arn(),
            "the answer carries no credentials",
            "check the emulator's STS",
        ));
    };
    Ok(Some(RoleCredentials {
        role_name: role.role_name().to_owned(),
        access_key_id: credentials.access_key_id().to_owned(),
        secret_access_key: credentials.secret_access_key().to_owned(),
        session_token: credentials.session_token().to_owned(),
        expiration: credentials.expiration().secs(),
    }))
}

/// What EC2 does when an instance's operating system shuts it down: `stop` (its default) or
/// `terminate` (the instance's `InstanceInitiatedShutdownBehavior`), done to the emulator's
/// instance as AWS would. Returns the behaviour applied.
pub async fn shut_down_from_inside(
    clients: &Clients,
    instance_id: &str,
) -> Result<&'static str, AwsError> {
    let behaviour = clients
        .ec2
        .describe_instance_attribute()
        .instance_id(instance_id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::InstanceInitiatedShutdownBehavior)
        .send()
        .await
        .op(
            "DescribeInstanceAttribute instanceInitiatedShutdownBehavior",
            instance_id,
        )?;
    let terminate = behaviour
        .instance_initiated_shutdown_behavior()
        .and_then(|v| v.value())
        == Some("terminate");
    if terminate {
        clients
            .ec2
            .terminate_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .op("TerminateInstances", instance_id)?;
        Ok("terminate")
    } else {
        clients
            .ec2
            .stop_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .op("StopInstances", instance_id)?;
        Ok("stop")
    }
}

/// An AMI of the emulator, as the lab runs machines from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabImage {
    pub id: String,
    /// The emulator's state (moto's are `available` at once; the lab says when they are).
    pub state: String,
    /// The instance `CreateImage` made it of (moto reports it as `sourceInstanceId`); none
    /// for an image the emulator was started with or one registered otherwise.
    pub source_instance: Option<String>,
}

/// Every AMI of this account in the region.
pub async fn images(clients: &Clients) -> Result<Vec<LabImage>, AwsError> {
    let answer = clients
        .ec2
        .describe_images()
        .owners("self")
        .send()
        .await
        .op("DescribeImages", "(owner self)")?;
    Ok(answer
        .images()
        .iter()
        .filter_map(|image| {
            Some(LabImage {
                id: image.image_id()?.to_owned(),
                state: image
                    .state()
                    .map_or(String::new(), |s| s.as_str().to_owned()),
                source_instance: image.source_instance_id().map(str::to_owned),
            })
        })
        .collect())
}
