//! Observing an environment: everything in the region tagged with its `project` and
//! `environment`, read with the SDK ([`Live::read`]) and mapped onto the topology's resource
//! ids with attributes spelled exactly as `rigger-topology` spells them ([`Live::observed`]),
//! so that after `up` the planner finds nothing to do and drift shows as actions.
//!
//! Mapping: security groups, key pair, load balancer, launch templates and Auto Scaling groups
//! by name; the instance profiles by their names (`<project>-<env>-<role>-instance`, and the
//! one profile all roles shared before, so that `up` deletes it) and tags (IAM cannot search
//! by tag); launch configurations, which have no tags, by their name
//! `<project>-<env>-<role>-<UTC timestamp>-<release>`, shown without the timestamp as the
//! topology names them, with the tags their name implies; a group's servers by slot (its
//! instances sorted by launch time, then id, are `<group>[1..n]`); stand-alone servers and
//! volumes by their `Name` tag. Two instances, volumes or launch configurations claiming one
//! name (an interrupted replacement) all show: the newest under the name, the others as
//! `<name> (<id>)`, which the planner deletes.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_ec2::types::{Filter, IpPermission, IpRange, UserIdGroupPair};
use rigger_config::LoadBalancerKind;
use rigger_plan::{Observed, ObservedResource};
use rigger_topology::{ResourceId, ResourceKind, Role, Value, tag};

use crate::Clients;
use crate::environment::{AwsEnvironment, Cidr, Network, Subnet};
use crate::error::{AwsError, Context as _, ErrorKind};

/// The device every data volume is attached at.
pub const DATA_DEVICE: &str = "/dev/sdf";
/// The tag a stand-alone server carries its recipe roles in (`cache,queue`).
pub const ROLES_TAG: &str = "roles";
/// The inline policy of rigger's instance role.
pub const ROLE_POLICY: &str = "rigger-secrets";

pub use crate::live_loadbalancer::LiveLoadBalancer;
pub use crate::tags::Tags;
use crate::tags::filter;

/// A security group and its ingress rules, each rule with the permission that revokes it.
#[derive(Debug, Clone, Default)]
pub struct LiveSecurityGroup {
    pub id: String,
    pub description: String,
    /// `tcp/443 from sg:<name>` -> the single-source permission.
    pub rules: BTreeMap<String, IpPermission>,
    pub tags: Tags,
}

#[derive(Debug, Clone, Default)]
pub struct LiveLaunchTemplate {
    pub id: String,
    pub default_version: i64,
    pub image: Option<String>,
    pub instance_type: Option<String>,
    pub security_group_ids: Vec<String>,
    pub volume_size: Option<i64>,
    pub key_pair: Option<String>,
    pub instance_profile: Option<String>,
    pub tags: Tags,
}

/// The launch settings a template or a configuration holds, borrowed for observation.
struct MachineSpec<'a> {
    release: Option<&'a str>,
    image: Option<&'a str>,
    instance_type: Option<&'a str>,
    security_group_ids: &'a [String],
    volume_size: Option<i64>,
    key_pair: Option<&'a str>,
    instance_profile: Option<&'a str>,
}

/// A launch configuration of the environment (known by its name: they have no tags).
#[derive(Debug, Clone, Default)]
pub struct LiveLaunchConfiguration {
    /// The name on AWS, with its timestamp.
    pub aws_name: String,
    /// The topology's name (without the timestamp).
    pub name: String,
    pub image: Option<String>,
    pub instance_type: Option<String>,
    pub security_group_ids: Vec<String>,
    pub volume_size: Option<i64>,
    pub key_pair: Option<String>,
    pub instance_profile: Option<String>,
}

/// The key pair rigger imported.
#[derive(Debug, Clone, Default)]
pub struct LiveKeyPair {
    pub id: String,
    pub name: String,
    /// `type base64`, without a comment.
    pub public_key: Option<String>,
    pub tags: Tags,
}

/// One of rigger's instance profiles and its role, of the same name (either may be missing
/// after an interrupted run).
#[derive(Debug, Clone, Default)]
pub struct LiveInstanceProfile {
    pub name: String,
    pub profile_exists: bool,
    /// Roles in the profile.
    pub roles: Vec<String>,
    pub role_exists: bool,
    /// What the role's inline policy allows, spelled as the topology spells it; `None` when
    /// the policy is missing.
    pub permissions: Option<BTreeSet<String>>,
    pub tags: Tags,
}

#[derive(Debug, Clone, Default)]
pub struct LiveGroup {
    pub min: i64,
    pub max: i64,
    pub desired: i64,
    pub launch_template: Option<String>,
    /// The name on AWS, with its timestamp.
    pub launch_configuration: Option<String>,
    /// The target of the group's CPU policy, if it has one.
    pub cpu_target: Option<i64>,
    pub load_balancer_names: Vec<String>,
    pub target_group_arns: Vec<String>,
    pub health_check_type: Option<String>,
    /// Instances in service or on their way, in slot order.
    pub instances: Vec<GroupInstance>,
    /// Every instance the group lists, whatever its lifecycle state (terminating, detaching).
    pub attached: BTreeSet<String>,
    pub tags: Tags,
}

#[derive(Debug, Clone, Default)]
pub struct GroupInstance {
    pub id: String,
    pub launch_template: Option<String>,
    /// The name on AWS, with its timestamp.
    pub launch_configuration: Option<String>,
    pub lifecycle: String,
    pub health: String,
}

#[derive(Debug, Clone, Default)]
pub struct LiveInstance {
    pub id: String,
    pub state: String,
    /// Seconds and nanoseconds since the epoch, for slot order.
    pub launched: (i64, u32),
    pub image: String,
    pub instance_type: String,
    pub private_address: Option<String>,
    /// The public IPv4 address, when the instance has one.
    pub public_address: Option<String>,
    /// The groups of the primary network interface (the instance's groups).
    pub security_group_ids: Vec<String>,
    /// The primary network interface, whose groups are the instance's.
    pub primary_interface: Option<String>,
    pub key_pair: Option<String>,
    /// The instance profile's name.
    pub instance_profile: Option<String>,
    pub tags: Tags,
}

/// A network interface rigger made for a stand-alone server: it holds the server's fixed
/// address across replacements.
#[derive(Debug, Clone, Default)]
pub struct LiveInterface {
    pub id: String,
    /// The `Name` tag: `<server>-eni`.
    pub name: String,
    pub status: String,
    pub private_address: Option<String>,
    pub tags: Tags,
}

#[derive(Debug, Clone, Default)]
pub struct LiveVolume {
    pub id: String,
    pub size: i64,
    pub encrypted: bool,
    pub volume_type: String,
    pub state: String,
    pub created: (i64, u32),
    /// Instance id, while attached.
    pub attached_to: Option<String>,
    pub tags: Tags,
}

/// Everything found of one environment.
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub security_groups: BTreeMap<String, LiveSecurityGroup>,
    pub key_pairs: Vec<LiveKeyPair>,
    /// rigger's instance profiles (and roles), by name.
    pub instance_profiles: BTreeMap<String, LiveInstanceProfile>,
    pub load_balancers: Vec<LiveLoadBalancer>,
    pub launch_templates: BTreeMap<String, LiveLaunchTemplate>,
    /// Newest first.
    pub launch_configurations: Vec<LiveLaunchConfiguration>,
    pub groups: BTreeMap<String, LiveGroup>,
    /// Every instance that is not terminated or shutting down, by id.
    pub instances: BTreeMap<String, LiveInstance>,
    pub volumes: Vec<LiveVolume>,
    pub interfaces: Vec<LiveInterface>,
    /// Names of the SSM parameters under the environment's prefix.
    pub parameters: Vec<String>,
    /// The image `rigger image build` recorded for the environment ([`crate::image`]).
    pub image: Option<crate::image::RecordedImage>,
    /// Whether fenced database servers (a failover's old primary, stopped and tagged
    /// [`crate::database::FENCED_TAG`]) and their volumes are seen. They are not, by default:
    /// `plan` and `up` must neither delete nor reuse them; `down` sets this to remove them.
    pub fenced_included: bool,
}

/// Finds the environment's VPC (rigger.toml's `vpc`, or the region's default VPC) and its
/// subnets (rigger.toml's `subnets`, or the VPC's default subnets).
pub async fn network(env: &AwsEnvironment, clients: &Clients) -> Result<Network, AwsError> {
    let aws = env.aws();
    let (request, what) = match &aws.vpc {
        Some(id) => (clients.ec2.describe_vpcs().vpc_ids(id), id.clone()),
        None => (
            clients
                .ec2
                .describe_vpcs()
                .filters(filter("isDefault", ["true"])),
            format!("(default VPC of {})", clients.region),
        ),
    };
    let vpcs = match request.send().await.op("DescribeVpcs", &what) {
        Err(error) if error.kind() == ErrorKind::NotFound => None,
        other => Some(other?),
    };
    let Some(vpc) = vpcs.as_ref().and_then(|v| v.vpcs().first()) else {
        return Err(match &aws.vpc {
            Some(id) => AwsError::precondition(
                "DescribeVpcs",
                id,
                format!("the VPC does not exist in {}", clients.region),
                "check `vpc` in rigger.toml (`aws ec2 describe-vpcs` lists the region's VPCs), or leave it out to use the default VPC",
            ),
            None => AwsError::precondition(
                "DescribeVpcs",
                what,
                "the region has no default VPC",
                "set `vpc` (and `subnets`) in rigger.toml, or create a default VPC with `aws ec2 create-default-vpc`",
            ),
        });
    };
    let vpc_id = vpc.vpc_id().unwrap_or_default().to_owned();
    let vpc_cidr = vpc
        .cidr_block()
        .and_then(|c| c.parse().ok())
        .unwrap_or(Cidr {
            addr: [172, 31, 0, 0].into(),
            prefix: 16,
        });
    let chosen = &aws.subnets;
    let answer = if chosen.is_empty() {
        clients
            .ec2
            .describe_subnets()
            .filters(filter("vpc-id", [vpc_id.as_str()]))
            .send()
            .await
            .op("DescribeSubnets", &vpc_id)?
    } else {
        clients
            .ec2
            .describe_subnets()
            .set_subnet_ids(Some(chosen.clone()))
            .send()
            .await
            .op("DescribeSubnets", chosen.join(", "))?
    };
    if !chosen.is_empty() {
        for id in chosen {
            let found = answer
                .subnets()
                .iter()
                .find(|s| s.subnet_id() == Some(id.as_str()));
            match found.and_then(|s| s.vpc_id()) {
                None => {
                    return Err(AwsError::precondition(
                        "DescribeSubnets",
                        id,
                        format!("the subnet does not exist in {}", clients.region),
                        "check `subnets` in rigger.toml (`aws ec2 describe-subnets` lists them)",
                    ));
                }
                Some(other) if other != vpc_id => {
                    let help = if aws.vpc.is_some() {
                        "list only subnets of the environment's `vpc` in `subnets`".to_owned()
                    } else {
                        format!(
                            "set `vpc = \"{other}\"` in rigger.toml (without it the environment uses the default VPC), or list subnets of the default VPC"
                        )
                    };
                    return Err(AwsError::precondition(
                        "DescribeSubnets",
                        id,
                        format!("the subnet belongs to {other}, not to {vpc_id}"),
                        help,
                    ));
                }
                Some(_) => {}
            }
        }
    }
    let mut subnets: Vec<Subnet> = answer
        .subnets()
        .iter()
        .filter(|s| !chosen.is_empty() || s.default_for_az().unwrap_or(true))
        .filter_map(|s| {
            Some(Subnet {
                id: s.subnet_id()?.to_owned(),
                zone: s.availability_zone()?.to_owned(),
                cidr: s.cidr_block()?.parse().ok()?,
            })
        })
        .collect();
    subnets.sort_by(|a, b| a.zone.cmp(&b.zone).then(a.id.cmp(&b.id)));
    if subnets.is_empty() {
        return Err(AwsError::precondition(
            "DescribeSubnets",
            vpc_id,
            "the VPC has no default subnets",
            "list the subnets to use in `subnets` in rigger.toml, or create default ones with `aws ec2 create-default-subnet --availability-zone ZONE`",
        ));
    }
    Ok(Network {
        vpc_id,
        vpc_cidr,
        subnets,
    })
}

fn ec2_tags(tags: &[aws_sdk_ec2::types::Tag]) -> Tags {
    tags.iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_owned(),
                t.value().unwrap_or_default().to_owned(),
            ))
        })
        .collect()
}

fn time(t: Option<&aws_sdk_ec2::primitives::DateTime>) -> (i64, u32) {
    t.map_or((0, 0), |t| (t.secs(), t.subsec_nanos()))
}

impl Live {
    /// Reads everything tagged with `env`'s project and environment.
    pub async fn read(env: &AwsEnvironment, clients: &Clients) -> Result<Live, AwsError> {
        let project = env.project().to_owned();
        let name = env.name.clone();
        let ours = || {
            [
                filter(&format!("tag:{}", tag::PROJECT), [project.as_str()]),
                filter(&format!("tag:{}", tag::ENVIRONMENT), [name.as_str()]),
            ]
        };
        let scope = format!("(tagged {}/{})", project, name);
        let mut live = Live::default();

        // Security groups.
        let mut groups = Vec::new();
        let mut pages = clients
            .ec2
            .describe_security_groups()
            .set_filters(Some(ours().to_vec()))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.op("DescribeSecurityGroups", &scope)?;
            groups.extend(page.security_groups().iter().cloned());
        }
        let names_by_id: BTreeMap<String, String> = groups
            .iter()
            .filter_map(|g| Some((g.group_id()?.to_owned(), g.group_name()?.to_owned())))
            .collect();
        for group in &groups {
            let mut rules = BTreeMap::new();
            for permission in group.ip_permissions() {
                for (text, single) in split_permission(permission, &names_by_id) {
                    rules.insert(text, single);
                }
            }
            live.security_groups.insert(
                group.group_name().unwrap_or_default().to_owned(),
                LiveSecurityGroup {
                    id: group.group_id().unwrap_or_default().to_owned(),
                    description: group.description().unwrap_or_default().to_owned(),
                    rules,
                    tags: ec2_tags(group.tags()),
                },
            );
        }

        // Instances (not terminated), volumes, launch templates.
        let mut pages = clients
            .ec2
            .describe_instances()
            .set_filters(Some(ours().to_vec()))
            .filters(filter(
                "instance-state-name",
                ["pending", "running", "stopping", "stopped"],
            ))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.op("DescribeInstances", &scope)?;
            for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                let id = instance.instance_id().unwrap_or_default().to_owned();
                // An instance's groups are its primary interface's (moto leaves the
                // instance's own list empty when it was launched on an existing interface).
                let primary = instance
                    .network_interfaces()
                    .iter()
                    .find(|n| n.attachment().and_then(|a| a.device_index()) == Some(0));
                let security_group_ids: Vec<String> = match primary {
                    Some(interface) if !interface.groups().is_empty() => interface
                        .groups()
                        .iter()
                        .filter_map(|g| g.group_id().map(str::to_owned))
                        .collect(),
                    _ => instance
                        .security_groups()
                        .iter()
                        .filter_map(|g| g.group_id().map(str::to_owned))
                        .collect(),
                };
                live.instances.insert(
                    id.clone(),
                    LiveInstance {
                        id,
                        state: instance
                            .state()
                            .and_then(|s| s.name())
                            .map_or("unknown".into(), |n| n.as_str().to_owned()),
                        launched: time(instance.launch_time()),
                        image: instance.image_id().unwrap_or_default().to_owned(),
                        instance_type: instance
                            .instance_type()
                            .map_or(String::new(), |t| t.as_str().to_owned()),
                        private_address: instance.private_ip_address().map(str::to_owned),
                        public_address: instance.public_ip_address().map(str::to_owned),
                        security_group_ids,
                        primary_interface: primary
                            .and_then(|n| n.network_interface_id())
                            .map(str::to_owned),
                        key_pair: instance.key_name().map(str::to_owned),
                        instance_profile: instance
                            .iam_instance_profile()
                            .and_then(|p| p.arn())
                            .map(profile_name),
                        tags: ec2_tags(instance.tags()),
                    },
                );
            }
        }
        let mut pages = clients
            .ec2
            .describe_volumes()
            .set_filters(Some(ours().to_vec()))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.op("DescribeVolumes", &scope)?;
            for volume in page.volumes() {
                let state = volume
                    .state()
                    .map_or("unknown".into(), |s| s.as_str().to_owned());
                if state == "deleting" || state == "deleted" {
                    continue;
                }
                live.volumes.push(LiveVolume {
                    id: volume.volume_id().unwrap_or_default().to_owned(),
                    size: i64::from(volume.size().unwrap_or_default()),
                    encrypted: volume.encrypted().unwrap_or_default(),
                    volume_type: volume
                        .volume_type()
                        .map_or(String::new(), |t| t.as_str().to_owned()),
                    state,
                    created: time(volume.create_time()),
                    attached_to: volume
                        .attachments()
                        .iter()
                        .find(|a| {
                            a.state()
                                .is_some_and(|s| matches!(s.as_str(), "attached" | "attaching"))
                        })
                        .and_then(|a| a.instance_id().map(str::to_owned)),
                    tags: ec2_tags(volume.tags()),
                });
            }
        }
        let interfaces = clients
            .ec2
            .describe_network_interfaces()
            .set_filters(Some(ours().to_vec()))
            .send()
            .await
            .op("DescribeNetworkInterfaces", &scope)?;
        for interface in interfaces.network_interfaces() {
            let tags = ec2_tags(interface.tag_set());
            live.interfaces.push(LiveInterface {
                id: interface
                    .network_interface_id()
                    .unwrap_or_default()
                    .to_owned(),
                name: tags.get("Name").cloned().unwrap_or_default(),
                status: interface
                    .status()
                    .map_or(String::new(), |s| s.as_str().to_owned()),
                private_address: interface.private_ip_address().map(str::to_owned),
                tags,
            });
        }
        let templates = clients
            .ec2
            .describe_launch_templates()
            .set_filters(Some(ours().to_vec()))
            .send()
            .await
            .op("DescribeLaunchTemplates", &scope)?;
        for template in templates.launch_templates() {
            let id = template.launch_template_id().unwrap_or_default().to_owned();
            let template_name = template
                .launch_template_name()
                .unwrap_or_default()
                .to_owned();
            let versions = clients
                .ec2
                .describe_launch_template_versions()
                .launch_template_id(&id)
                .versions("$Default")
                .send()
                .await
                .op("DescribeLaunchTemplateVersions", &template_name)?;
            let data = versions
                .launch_template_versions()
                .first()
                .and_then(|v| v.launch_template_data());
            live.launch_templates.insert(
                template_name,
                LiveLaunchTemplate {
                    id,
                    default_version: template.default_version_number().unwrap_or(1),
                    image: data.and_then(|d| d.image_id()).map(str::to_owned),
                    instance_type: data
                        .and_then(|d| d.instance_type())
                        .map(|t| t.as_str().to_owned()),
                    security_group_ids: data
                        .map(|d| d.security_group_ids().to_vec())
                        .unwrap_or_default(),
                    volume_size: data.and_then(|d| {
                        d.block_device_mappings()
                            .iter()
                            .find(|m| m.device_name() == Some(DATA_DEVICE))
                            .and_then(|m| m.ebs())
                            .and_then(|e| e.volume_size())
                            .map(i64::from)
                    }),
                    key_pair: data.and_then(|d| d.key_name()).map(str::to_owned),
                    instance_profile: data
                        .and_then(|d| d.iam_instance_profile())
                        .and_then(|p| p.name().map(str::to_owned).or(p.arn().map(profile_name))),
                    tags: ec2_tags(template.tags()),
                },
            );
        }

        live.read_key_pairs(clients, ours().to_vec(), &scope)
            .await?;
        for name in env.names.instance_profiles() {
            if let Some(profile) = read_instance_profile(env, clients, &name).await? {
                live.instance_profiles.insert(name, profile);
            }
        }
        live.read_launch_configurations(env, clients).await?;

        live.read_groups(env, clients, &scope).await?;
        live.read_load_balancers(env, clients).await?;

        live.parameters.extend(
            crate::parameters::under(clients, &env.parameter_prefix(), false)
                .await?
                .into_iter()
                .map(|(name, _)| name),
        );
        live.image = crate::image::recorded(env, clients).await?;
        Ok(live)
    }

    async fn read_groups(
        &mut self,
        env: &AwsEnvironment,
        clients: &Clients,
        scope: &str,
    ) -> Result<(), AwsError> {
        use aws_sdk_autoscaling::types::Filter as AsgFilter;
        let mut pages = clients
            .autoscaling
            .describe_auto_scaling_groups()
            .filters(
                AsgFilter::builder()
                    .name(format!("tag:{}", tag::PROJECT))
                    .values(env.project())
                    .build(),
            )
            .filters(
                AsgFilter::builder()
                    .name(format!("tag:{}", tag::ENVIRONMENT))
                    .values(&env.name)
                    .build(),
            )
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.op("DescribeAutoScalingGroups", scope)?;
            for group in page.auto_scaling_groups() {
                let tags: Tags = group
                    .tags()
                    .iter()
                    .filter_map(|t| {
                        Some((
                            t.key()?.to_owned(),
                            t.value().unwrap_or_default().to_owned(),
                        ))
                    })
                    .collect();
                // The filter is the service's; check the tags ourselves before touching it.
                if tags.get(tag::PROJECT).map(String::as_str) != Some(env.project())
                    || tags.get(tag::ENVIRONMENT) != Some(&env.name)
                {
                    continue;
                }
                let mut instances: Vec<GroupInstance> = group
                    .instances()
                    .iter()
                    .filter(|i| {
                        i.lifecycle_state().is_some_and(|s| {
                            let s = s.as_str();
                            s == "InService" || s.starts_with("Pending")
                        })
                    })
                    .map(|i| GroupInstance {
                        id: i.instance_id().unwrap_or_default().to_owned(),
                        launch_template: i
                            .launch_template()
                            .and_then(|t| t.launch_template_name())
                            .map(str::to_owned),
                        launch_configuration: i.launch_configuration_name().map(str::to_owned),
                        lifecycle: i
                            .lifecycle_state()
                            .map_or(String::new(), |s| s.as_str().to_owned()),
                        health: i.health_status().unwrap_or_default().to_owned(),
                    })
                    .collect();
                instances.sort_by_key(|i| {
                    (
                        self.instances
                            .get(&i.id)
                            .map_or((i64::MAX, 0), |x| x.launched),
                        i.id.clone(),
                    )
                });
                self.groups.insert(
                    group
                        .auto_scaling_group_name()
                        .unwrap_or_default()
                        .to_owned(),
                    LiveGroup {
                        min: i64::from(group.min_size().unwrap_or_default()),
                        max: i64::from(group.max_size().unwrap_or_default()),
                        desired: i64::from(group.desired_capacity().unwrap_or_default()),
                        launch_template: group
                            .launch_template()
                            .and_then(|t| t.launch_template_name())
                            .map(str::to_owned),
                        launch_configuration: group.launch_configuration_name().map(str::to_owned),
                        cpu_target: None,
                        load_balancer_names: group.load_balancer_names().to_vec(),
                        target_group_arns: group.target_group_arns().to_vec(),
                        health_check_type: group.health_check_type().map(str::to_owned),
                        instances,
                        attached: group
                            .instances()
                            .iter()
                            .filter_map(|i| i.instance_id().map(str::to_owned))
                            .collect(),
                        tags,
                    },
                );
            }
        }
        // Each group's CPU policy (named after the group: moto keys policies by name alone).
        if !self.groups.is_empty() {
            let mut pages = clients
                .autoscaling
                .describe_policies()
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.op("DescribePolicies", scope)?;
                for policy in page.scaling_policies() {
                    let (Some(group), Some(name)) =
                        (policy.auto_scaling_group_name(), policy.policy_name())
                    else {
                        continue;
                    };
                    if name != policy_name(group) {
                        continue;
                    }
                    if let Some(live) = self.groups.get_mut(group) {
                        live.cpu_target = policy
                            .target_tracking_configuration()
                            .and_then(|t| t.target_value())
                            .map(|v| v.round() as i64);
                    }
                }
            }
        }
        Ok(())
    }

    /// Key pairs tagged as the environment's (rigger imports at most one).
    async fn read_key_pairs(
        &mut self,
        clients: &Clients,
        filters: Vec<Filter>,
        scope: &str,
    ) -> Result<(), AwsError> {
        let answer = clients
            .ec2
            .describe_key_pairs()
            .set_filters(Some(filters))
            .include_public_key(true)
            .send()
            .await
            .op("DescribeKeyPairs", scope)?;
        for key in answer.key_pairs() {
            self.key_pairs.push(LiveKeyPair {
                id: key.key_pair_id().unwrap_or_default().to_owned(),
                name: key.key_name().unwrap_or_default().to_owned(),
                public_key: key
                    .public_key()
                    .map(|k| k.split_whitespace().take(2).collect::<Vec<_>>().join(" ")),
                tags: ec2_tags(key.tags()),
            });
        }
        Ok(())
    }

    /// The environment's launch configurations, found by name (they have no tags), newest
    /// first.
    async fn read_launch_configurations(
        &mut self,
        env: &AwsEnvironment,
        clients: &Clients,
    ) -> Result<(), AwsError> {
        let mut pages = clients
            .autoscaling
            .describe_launch_configurations()
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.op(
                "DescribeLaunchConfigurations",
                format!("({}-{}-*)", env.project(), env.name),
            )?;
            for lc in page.launch_configurations() {
                let aws_name = lc.launch_configuration_name().unwrap_or_default();
                let Some(name) = env.names.launch_configuration_from_aws(aws_name) else {
                    continue;
                };
                self.launch_configurations.push(LiveLaunchConfiguration {
                    aws_name: aws_name.to_owned(),
                    name,
                    image: lc.image_id().map(str::to_owned),
                    instance_type: lc.instance_type().map(str::to_owned),
                    security_group_ids: lc.security_groups().to_vec(),
                    volume_size: lc
                        .block_device_mappings()
                        .iter()
                        .find(|m| m.device_name() == Some(DATA_DEVICE))
                        .and_then(|m| m.ebs())
                        .and_then(|e| e.volume_size())
                        .map(i64::from),
                    key_pair: lc.key_name().filter(|k| !k.is_empty()).map(str::to_owned),
                    instance_profile: lc
                        .iam_instance_profile()
                        .filter(|p| !p.is_empty())
                        .map(profile_name),
                });
            }
        }
        // The timestamp sorts as text.
        self.launch_configurations
            .sort_by(|a, b| b.aws_name.cmp(&a.aws_name));
        Ok(())
    }

    async fn read_load_balancers(
        &mut self,
        env: &AwsEnvironment,
        clients: &Clients,
    ) -> Result<(), AwsError> {
        let name = env.names.load_balancer();
        let owned = |tags: &Tags| {
            tags.get(tag::PROJECT).map(String::as_str) == Some(env.project())
                && tags.get(tag::ENVIRONMENT) == Some(&env.name)
        };
        let classic = crate::live_loadbalancer::read_classic(clients, &name).await?;
        let application = crate::live_loadbalancer::read_application(clients, &name).await?;
        // Only ours: a load balancer of the same name without our tags is left alone.
        self.load_balancers.extend(
            classic
                .into_iter()
                .chain(application)
                .filter(|lb| owned(&lb.tags)),
        );
        Ok(())
    }

    /// The security group named `name`'s id, if it exists.
    pub fn sg_id(&self, name: &str) -> Option<&str> {
        self.security_groups.get(name).map(|g| g.id.as_str())
    }

    fn sg_names(&self, ids: &[String]) -> BTreeSet<String> {
        ids.iter()
            .map(|id| {
                self.security_groups
                    .iter()
                    .find(|(_, g)| &g.id == id)
                    .map_or_else(|| id.clone(), |(name, _)| name.clone())
            })
            .collect()
    }

    /// The load balancer of the configured kind, if any.
    pub fn load_balancer(&self, kind: LoadBalancerKind) -> Option<&LiveLoadBalancer> {
        self.load_balancers.iter().find(|lb| lb.kind == Some(kind))
    }

    /// The group that launched the instance: AWS tags its instances with the group's name,
    /// and rigger's launch templates name them after it (the tag may go when an instance is
    /// detached).
    fn launching_group<'a>(&self, instance: &'a LiveInstance) -> Option<&'a str> {
        instance
            .tags
            .get("aws:autoscaling:groupName")
            .or_else(|| {
                instance
                    .tags
                    .get("Name")
                    .filter(|n| self.groups.contains_key(n.as_str()))
            })
            .map(String::as_str)
    }

    /// Is the instance a member of the Auto Scaling group that launched it?
    fn in_its_group(&self, instance: &LiveInstance) -> bool {
        self.launching_group(instance)
            .and_then(|group| self.groups.get(group))
            .is_some_and(|group| group.attached.contains(&instance.id))
    }

    /// Instances a group launched that are no longer in it: detached by a deploy that was
    /// interrupted before it terminated them. They still run (and cost), so they are listed
    /// as stand-alone servers, which no topology wants: `plan` shows them, `up` and `down`
    /// terminate them, and the next deploy cleans them up first.
    pub fn detached_group_instances(&self) -> Vec<&LiveInstance> {
        self.instances
            .values()
            .filter(|i| self.launching_group(i).is_some() && !self.in_its_group(i))
            .collect()
    }

    /// Stand-alone instances (not in a group) by `Name` tag, newest first per name.
    pub fn stand_alone_instances(&self) -> BTreeMap<String, Vec<&LiveInstance>> {
        let mut by_name: BTreeMap<String, Vec<&LiveInstance>> = BTreeMap::new();
        for instance in self.instances.values() {
            if self.in_its_group(instance)
                || (!self.fenced_included && crate::tags::is_fenced(&instance.tags))
            {
                continue;
            }
            let name = instance
                .tags
                .get("Name")
                .cloned()
                .unwrap_or_else(|| instance.id.clone());
            by_name.entry(name).or_default().push(instance);
        }
        for instances in by_name.values_mut() {
            instances.sort_by_key(|i| std::cmp::Reverse((i.launched, i.id.clone())));
        }
        by_name
    }

    /// Volumes by `Name` tag, newest first per name.
    pub fn volumes_by_name(&self) -> BTreeMap<String, Vec<&LiveVolume>> {
        let mut by_name: BTreeMap<String, Vec<&LiveVolume>> = BTreeMap::new();
        for volume in &self.volumes {
            if !self.fenced_included && crate::tags::is_fenced(&volume.tags) {
                continue;
            }
            let name = volume
                .tags
                .get("Name")
                .cloned()
                .unwrap_or_else(|| volume.id.clone());
            by_name.entry(name).or_default().push(volume);
        }
        for volumes in by_name.values_mut() {
            volumes.sort_by_key(|v| std::cmp::Reverse((v.created, v.id.clone())));
        }
        by_name
    }

    /// The instance of stand-alone server `name`, if it runs.
    pub fn server(&self, name: &str) -> Option<&LiveInstance> {
        self.stand_alone_instances()
            .get(name)
            .and_then(|list| list.first().copied())
    }

    /// The network interface of stand-alone server `server`, if it exists.
    pub fn interface(&self, server: &str) -> Option<&LiveInterface> {
        let name = interface_name(server);
        self.interfaces.iter().find(|i| i.name == name)
    }

    /// The volume named `name`, if it exists.
    pub fn volume(&self, name: &str) -> Option<&LiveVolume> {
        self.volumes_by_name()
            .get(name)
            .and_then(|list| list.first().copied())
    }

    /// The world in the planner's terms.
    pub fn observed(&self, env: &AwsEnvironment) -> Observed {
        let mut observed = Observed::empty();
        let mut put = |kind: ResourceKind,
                       name: &str,
                       attributes: Vec<(&str, Value)>,
                       tags: &Tags,
                       depends_on: Vec<ResourceId>| {
            observed.resources.insert(
                ResourceId::new(kind, name),
                ObservedResource {
                    attributes: attributes
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect(),
                    tags: tags
                        .iter()
                        .filter(|(k, _)| {
                            [tag::PROJECT, tag::ENVIRONMENT, tag::ROLE, tag::RELEASE]
                                .contains(&k.as_str())
                        })
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    depends_on: depends_on
                        .into_iter()
                        .filter(|d| !(d.kind == kind && d.name == name))
                        .collect(),
                },
            );
        };
        let sg = |name: &str| ResourceId::new(ResourceKind::SecurityGroup, name);
        let set = |names: BTreeSet<String>| Value::Set(names);

        for (name, group) in &self.security_groups {
            let depends_on = group
                .rules
                .keys()
                .filter_map(|rule| rule.split_once(" from sg:").map(|(_, s)| sg(s)))
                .collect();
            put(
                ResourceKind::SecurityGroup,
                name,
                vec![
                    ("description", Value::from(group.description.as_str())),
                    ("ingress", set(group.rules.keys().cloned().collect())),
                ],
                &group.tags,
                depends_on,
            );
        }

        let configured = env.aws().load_balancer;
        for lb in &self.load_balancers {
            let mut attributes = vec![
                (
                    "kind",
                    Value::from(lb.kind.map_or("unknown".to_owned(), |k| k.to_string())),
                ),
                (
                    "listeners",
                    Value::List(
                        lb.listeners
                            .iter()
                            .map(|l| Value::from(l.as_str()))
                            .collect(),
                    ),
                ),
                (
                    "security_groups",
                    set(self.sg_names(&lb.security_group_ids)),
                ),
            ];
            if let Some(health) = &lb.health_check {
                attributes.push(("health_check", Value::from(health.as_str())));
            }
            if let Some(timing) = &lb.health_check_timing {
                attributes.push(("health_check_timing", Value::from(timing.as_str())));
            }
            if let Some(certificate) = &lb.certificate {
                attributes.push(("certificate", Value::from(certificate.as_str())));
            }
            if let Some(policy) = &lb.tls_policy {
                attributes.push(("tls_policy", Value::from(policy.as_str())));
            }
            if let Some(cross_zone) = lb.cross_zone {
                attributes.push(("cross_zone", Value::Bool(cross_zone)));
            }
            if let Some(seconds) = lb.draining_seconds {
                attributes.push(("connection_draining_seconds", Value::Integer(seconds)));
            }
            let depends_on = self
                .sg_names(&lb.security_group_ids)
                .iter()
                .map(|n| sg(n))
                .collect();
            // Two load balancers of one name (a change of kind in progress): the configured
            // kind keeps the name, the other is shown under its kind, to be deleted.
            let name = if lb.kind == Some(configured) {
                env.names.load_balancer()
            } else {
                format!(
                    "{} ({})",
                    env.names.load_balancer(),
                    lb.kind.map_or("unknown".to_owned(), |k| k.to_string())
                )
            };
            put(
                ResourceKind::LoadBalancer,
                &name,
                attributes,
                &lb.tags,
                depends_on,
            );
        }

        for key in &self.key_pairs {
            let mut attributes = Vec::new();
            if let Some(public_key) = &key.public_key {
                attributes.push(("public_key", Value::from(public_key.as_str())));
            }
            put(
                ResourceKind::KeyPair,
                &key.name,
                attributes,
                &key.tags,
                Vec::new(),
            );
        }

        for profile in self.instance_profiles.values() {
            let mut attributes = Vec::new();
            // The profile holds its role; a missing profile or role shows as a different one.
            if profile.profile_exists
                && profile.role_exists
                && profile.roles == [profile.name.clone()]
            {
                attributes.push(("role", Value::from(profile.name.as_str())));
            }
            if let Some(permissions) = &profile.permissions {
                attributes.push(("permissions", set(permissions.clone())));
            }
            put(
                ResourceKind::InstanceProfile,
                &profile.name,
                attributes,
                &profile.tags,
                Vec::new(),
            );
        }

        for (name, configuration) in self.launch_configurations_by_name() {
            let release = name
                .strip_prefix(&format!("{}-", env.names.group(Role::Web)))
                .or_else(|| name.strip_prefix(&format!("{}-", env.names.group(Role::Worker))))
                .unwrap_or_default()
                .to_owned();
            let role = if name.starts_with(&format!("{}-", env.names.group(Role::Web))) {
                Role::Web
            } else {
                Role::Worker
            };
            let (attributes, depends_on) = self.machine_attributes(&MachineSpec {
                release: Some(&release),
                image: configuration.image.as_deref(),
                instance_type: configuration.instance_type.as_deref(),
                security_group_ids: &configuration.security_group_ids,
                volume_size: configuration.volume_size,
                key_pair: configuration.key_pair.as_deref(),
                instance_profile: configuration.instance_profile.as_deref(),
            });
            // Launch configurations have no tags: the name says whose they are.
            let tags: Tags = [
                (tag::PROJECT, env.project()),
                (tag::ENVIRONMENT, env.name.as_str()),
                (tag::ROLE, role.as_str()),
                (tag::RELEASE, release.as_str()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
            put(
                ResourceKind::LaunchConfiguration,
                &name,
                attributes,
                &tags,
                depends_on,
            );
        }

        for (name, template) in &self.launch_templates {
            let (attributes, depends_on) = self.machine_attributes(&MachineSpec {
                release: template.tags.get(tag::RELEASE).map(String::as_str),
                image: template.image.as_deref(),
                instance_type: template.instance_type.as_deref(),
                security_group_ids: &template.security_group_ids,
                volume_size: template.volume_size,
                key_pair: template.key_pair.as_deref(),
                instance_profile: template.instance_profile.as_deref(),
            });
            put(
                ResourceKind::LaunchTemplate,
                name,
                attributes,
                &template.tags,
                depends_on,
            );
        }

        for (name, group) in &self.groups {
            let mut attributes = vec![
                ("min", Value::Integer(group.min)),
                ("max", Value::Integer(group.max)),
                ("desired", Value::Integer(group.desired)),
            ];
            let mut depends_on = Vec::new();
            if let Some(template) = &group.launch_template {
                attributes.push(("launch_template", Value::from(template.as_str())));
                depends_on.push(ResourceId::new(ResourceKind::LaunchTemplate, template));
            }
            if let Some(aws_name) = &group.launch_configuration {
                let configuration = self.launch_configuration_id(aws_name);
                attributes.push(("launch_configuration", Value::from(configuration.as_str())));
                depends_on.push(ResourceId::new(
                    ResourceKind::LaunchConfiguration,
                    configuration,
                ));
            }
            if let Some(target) = group.cpu_target {
                attributes.push(("cpu_target", Value::Integer(target)));
            }
            if let Some(kind) = &group.health_check_type {
                attributes.push(("health_check_type", Value::from(kind.as_str())));
            }
            if let Some(attached) = self.attached_load_balancer(env, group) {
                depends_on.push(ResourceId::new(ResourceKind::LoadBalancer, &attached));
                attributes.push(("load_balancer", Value::from(attached)));
            }
            put(
                ResourceKind::AutoScalingGroup,
                name,
                attributes,
                &group.tags,
                depends_on,
            );
            for (slot, member) in group.instances.iter().enumerate() {
                let tags = self
                    .instances
                    .get(&member.id)
                    .map(|i| i.tags.clone())
                    .unwrap_or_else(|| group.tags.clone());
                let mut attributes = Vec::new();
                if let Some(template) = &member.launch_template {
                    attributes.push(("launch_template", Value::from(template.as_str())));
                }
                if let Some(aws_name) = &member.launch_configuration {
                    attributes.push((
                        "launch_configuration",
                        Value::from(self.launch_configuration_id(aws_name)),
                    ));
                }
                put(
                    ResourceKind::GroupServer,
                    &format!("{name}[{}]", slot + 1),
                    attributes,
                    &tags,
                    vec![ResourceId::new(ResourceKind::AutoScalingGroup, name)],
                );
            }
        }

        let volume_names: BTreeMap<&str, String> = self
            .volumes
            .iter()
            .filter_map(|v| {
                Some((
                    v.attached_to.as_deref()?,
                    v.tags.get("Name").cloned().unwrap_or_else(|| v.id.clone()),
                ))
            })
            .collect();
        for (name, instances) in self.stand_alone_instances() {
            for (index, instance) in instances.iter().enumerate() {
                let id = if index == 0 {
                    name.clone()
                } else {
                    format!("{name} ({})", instance.id)
                };
                let groups = self.sg_names(&instance.security_group_ids);
                let mut depends_on: Vec<ResourceId> = groups.iter().map(|n| sg(n)).collect();
                let mut attributes = vec![
                    ("image", Value::from(instance.image.as_str())),
                    (
                        "instance_type",
                        Value::from(instance.instance_type.as_str()),
                    ),
                    ("security_groups", set(groups)),
                ];
                if let Some(roles) = instance.tags.get(ROLES_TAG) {
                    attributes.push((
                        "roles",
                        set(roles
                            .split(',')
                            .filter(|r| !r.is_empty())
                            .map(str::to_owned)
                            .collect()),
                    ));
                }
                if let Some(volume) = volume_names.get(instance.id.as_str()) {
                    depends_on.push(ResourceId::new(ResourceKind::Volume, volume));
                    attributes.push(("data_volume", Value::from(volume.as_str())));
                }
                self.access_attributes(
                    &mut attributes,
                    &mut depends_on,
                    instance.key_pair.as_deref(),
                    instance.instance_profile.as_deref(),
                );
                put(
                    ResourceKind::Server,
                    &id,
                    attributes,
                    &instance.tags,
                    depends_on,
                );
            }
        }

        for (name, volumes) in self.volumes_by_name() {
            for (index, volume) in volumes.iter().enumerate() {
                let id = if index == 0 {
                    name.clone()
                } else {
                    format!("{name} ({})", volume.id)
                };
                put(
                    ResourceKind::Volume,
                    &id,
                    vec![
                        ("size_gib", Value::Integer(volume.size)),
                        ("encrypted", Value::Bool(volume.encrypted)),
                        ("volume_type", Value::from(volume.volume_type.as_str())),
                    ],
                    &volume.tags,
                    Vec::new(),
                );
            }
        }
        observed
    }

    /// What launch templates and launch configurations both say about the servers they
    /// launch, as the topology's attributes, with the resources they depend on.
    fn machine_attributes(
        &self,
        spec: &MachineSpec<'_>,
    ) -> (Vec<(&'static str, Value)>, Vec<ResourceId>) {
        let groups = self.sg_names(spec.security_group_ids);
        let mut depends_on: Vec<ResourceId> = groups
            .iter()
            .map(|n| ResourceId::new(ResourceKind::SecurityGroup, n))
            .collect();
        let mut attributes = vec![("security_groups", Value::Set(groups))];
        if let Some(release) = spec.release {
            attributes.push(("release", Value::from(release)));
        }
        if let Some(image) = spec.image {
            attributes.push(("image", Value::from(image)));
        }
        if let Some(instance_type) = spec.instance_type {
            attributes.push(("instance_type", Value::from(instance_type)));
        }
        if let Some(size) = spec.volume_size {
            attributes.push(("volume_size_gib", Value::Integer(size)));
        }
        self.access_attributes(
            &mut attributes,
            &mut depends_on,
            spec.key_pair,
            spec.instance_profile,
        );
        (attributes, depends_on)
    }

    /// A server's (or template's) `key_pair` and `instance_profile`, with dependencies on them
    /// when they are rigger's, so they are deleted after what uses them.
    fn access_attributes(
        &self,
        attributes: &mut Vec<(&'static str, Value)>,
        depends_on: &mut Vec<ResourceId>,
        key_pair: Option<&str>,
        instance_profile: Option<&str>,
    ) {
        if let Some(key) = key_pair {
            attributes.push(("key_pair", Value::from(key)));
            if self.key_pairs.iter().any(|k| k.name == key) {
                depends_on.push(ResourceId::new(ResourceKind::KeyPair, key));
            }
        }
        if let Some(profile) = instance_profile {
            attributes.push(("instance_profile", Value::from(profile)));
            if self.instance_profiles.contains_key(profile) {
                depends_on.push(ResourceId::new(ResourceKind::InstanceProfile, profile));
            }
        }
    }

    /// Launch configurations by the topology's name: the newest under it, older ones of the
    /// same name (an interrupted replacement) as `<name> (<name on AWS>)`.
    pub fn launch_configurations_by_name(&self) -> Vec<(String, &LiveLaunchConfiguration)> {
        let mut seen = BTreeSet::new();
        self.launch_configurations
            .iter()
            .map(|lc| {
                if seen.insert(lc.name.clone()) {
                    (lc.name.clone(), lc)
                } else {
                    (format!("{} ({})", lc.name, lc.aws_name), lc)
                }
            })
            .collect()
    }

    /// The topology's id of the launch configuration named `aws_name` on AWS.
    pub fn launch_configuration_id(&self, aws_name: &str) -> String {
        self.launch_configurations_by_name()
            .into_iter()
            .find(|(_, lc)| lc.aws_name == aws_name)
            .map_or_else(|| aws_name.to_owned(), |(name, _)| name)
    }

    /// The name on AWS of the newest launch configuration the topology calls `name`.
    pub fn launch_configuration_aws_name(&self, name: &str) -> Option<&str> {
        self.launch_configurations
            .iter()
            .find(|lc| lc.name == name)
            .map(|lc| lc.aws_name.as_str())
    }

    /// The load balancer a group is attached to, as the topology names it: the name when the
    /// attachment is of the configured kind, `<name> (<kind>)` otherwise, so that a change of
    /// kind shows as an update of the group.
    fn attached_load_balancer(&self, env: &AwsEnvironment, group: &LiveGroup) -> Option<String> {
        let configured = env.aws().load_balancer;
        let name = env.names.load_balancer();
        let label = |kind: LoadBalancerKind, lb_name: &str| {
            if kind == configured && lb_name == name {
                lb_name.to_owned()
            } else {
                format!("{lb_name} ({kind})")
            }
        };
        if let Some(first) = group.load_balancer_names.first() {
            return Some(label(LoadBalancerKind::Classic, first));
        }
        if !group.target_group_arns.is_empty() {
            let ours = self
                .load_balancer(LoadBalancerKind::Application)
                .is_some_and(|lb| {
                    group
                        .target_group_arns
                        .iter()
                        .all(|arn| lb.target_groups.values().any(|t| t == arn))
                });
            return Some(if ours {
                label(LoadBalancerKind::Application, &name)
            } else {
                format!("{} (target groups)", group.target_group_arns.join(","))
            });
        }
        None
    }
}

/// The name of group `group`'s target-tracking CPU policy.
pub fn policy_name(group: &str) -> String {
    format!("{group}-cpu")
}

/// An instance profile's name from its ARN (`arn:aws:iam::1:instance-profile/path/NAME`), or
/// the name itself.
fn profile_name(arn_or_name: &str) -> String {
    arn_or_name
        .rsplit_once('/')
        .map_or(arn_or_name, |(_, name)| name)
        .to_owned()
}

/// rigger's instance profile and role `name`, if either exists with the environment's tags
/// (one of the same name without them is not rigger's and is left alone).
async fn read_instance_profile(
    env: &AwsEnvironment,
    clients: &Clients,
    name: &str,
) -> Result<Option<LiveInstanceProfile>, AwsError> {
    let name = name.to_owned();
    let owned = |tags: &Tags| {
        tags.get(tag::PROJECT).map(String::as_str) == Some(env.project())
            && tags.get(tag::ENVIRONMENT) == Some(&env.name)
    };
    let iam_tags = |tags: &[aws_sdk_iam::types::Tag]| -> Tags {
        tags.iter()
            .map(|t| (t.key().to_owned(), t.value().to_owned()))
            .collect()
    };
    let mut live = LiveInstanceProfile {
        name: name.clone(),
        ..LiveInstanceProfile::default()
    };
    match clients
        .iam
        .get_instance_profile()
        .instance_profile_name(&name)
        .send()
        .await
        .op("GetInstanceProfile", &name)
    {
        Err(error) if error.kind() == ErrorKind::NotFound => {}
        Err(error) => return Err(error),
        Ok(answer) => {
            if let Some(profile) = answer.instance_profile() {
                let tags = iam_tags(profile.tags());
                if owned(&tags) {
                    live.profile_exists = true;
                    live.roles = profile
                        .roles()
                        .iter()
                        .map(|r| r.role_name().to_owned())
                        .collect();
                    live.tags = tags;
                }
            }
        }
    }
    match clients
        .iam
        .get_role()
        .role_name(&name)
        .send()
        .await
        .op("GetRole", &name)
    {
        Err(error) if error.kind() == ErrorKind::NotFound => {}
        Err(error) => return Err(error),
        Ok(answer) => {
            let tags = answer
                .role()
                .map(|r| iam_tags(r.tags()))
                .unwrap_or_default();
            if owned(&tags) {
                live.role_exists = true;
                if !live.profile_exists {
                    live.tags = tags;
                }
            }
        }
    }
    if live.role_exists {
        match clients
            .iam
            .get_role_policy()
            .role_name(&name)
            .policy_name(ROLE_POLICY)
            .send()
            .await
            .op("GetRolePolicy", &name)
        {
            Err(error) if error.kind() == ErrorKind::NotFound => {}
            Err(error) => return Err(error),
            Ok(answer) => {
                live.permissions = Some(crate::policy::permissions(answer.policy_document()));
            }
        }
    }
    Ok((live.profile_exists || live.role_exists).then_some(live))
}

/// The `Name` of stand-alone server `server`'s network interface.
pub fn interface_name(server: &str) -> String {
    format!("{server}-eni")
}

/// Splits a permission into one rule per source, each spelled as the topology spells rules
/// (`tcp/443 from 0.0.0.0/0`, `tcp/80 from sg:<name>`) with the permission that revokes it.
pub(crate) fn split_permission(
    permission: &IpPermission,
    names_by_id: &BTreeMap<String, String>,
) -> Vec<(String, IpPermission)> {
    let protocol = permission.ip_protocol().unwrap_or("-1");
    let from = permission.from_port();
    let to = permission.to_port();
    let ports = match (protocol, from, to) {
        ("-1", _, _) => "all".to_owned(),
        (p, Some(f), Some(t)) if f == t => format!("{p}/{f}"),
        (p, Some(f), Some(t)) => format!("{p}/{f}-{t}"),
        (p, _, _) => p.to_owned(),
    };
    let base = || {
        IpPermission::builder()
            .ip_protocol(protocol)
            .set_from_port(from)
            .set_to_port(to)
    };
    let mut rules = Vec::new();
    for range in permission.ip_ranges() {
        if let Some(cidr) = range.cidr_ip() {
            rules.push((
                format!("{ports} from {cidr}"),
                base()
                    .ip_ranges(IpRange::builder().cidr_ip(cidr).build())
                    .build(),
            ));
        }
    }
    for range in permission.ipv6_ranges() {
        if let Some(cidr) = range.cidr_ipv6() {
            rules.push((
                format!("{ports} from {cidr}"),
                base().ipv6_ranges(range.clone()).build(),
            ));
        }
    }
    for list in permission.prefix_list_ids() {
        if let Some(id) = list.prefix_list_id() {
            rules.push((
                format!("{ports} from pl:{id}"),
                base().prefix_list_ids(list.clone()).build(),
            ));
        }
    }
    for pair in permission.user_id_group_pairs() {
        if let Some(id) = pair.group_id() {
            let source = names_by_id.get(id).map_or(id, String::as_str);
            rules.push((
                format!("{ports} from sg:{source}"),
                base()
                    .user_id_group_pairs(UserIdGroupPair::builder().group_id(id).build())
                    .build(),
            ));
        }
    }
    rules
}
