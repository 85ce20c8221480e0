//! Applying a plan: [`apply`] runs a [`rigger_plan::Plan`]'s steps wave by wave, the steps of
//! a wave in parallel, each converging one resource from what was observed to what the
//! topology wants. A failed step lets the rest of its wave finish, then stops; the next `up`
//! observes again and converges (every step is idempotent).
//!
//! Three orderings the plan cannot express are kept here: launch templates and configurations
//! are deleted last (a group may still use one until its own step switched it); a group's
//! servers are replaced one at a time (the group keeps serving); a security group's deletion is
//! retried while a dependency (a load balancer's network interfaces) is still going away.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use aws_sdk_autoscaling::types as asg;
use aws_sdk_ec2::types as ec2;
use rigger_plan::{Action, Plan, Step};
use rigger_topology::{Resource, ResourceKind, Topology, Value, tag};

use crate::context::{Ctx, Waits, context, retry_in_use};
use crate::environment::{AwsEnvironment, Network, StandAlone};
use crate::error::{AwsError, Context as _, ErrorKind};
use crate::live::{DATA_DEVICE, Live, ROLES_TAG};
use crate::live_loadbalancer;
use crate::tags::filter;
use crate::{Clients, loadbalancer, userdata};
use rigger_engine::progress::Progress;

/// Every server's metadata service answers only session requests (IMDSv2) whose responses
/// cannot travel past the server itself: a container or anything the server forwards for
/// cannot fetch the instance role's credentials. (User-data also lets only root reach it.)
const METADATA_HOP_LIMIT: i32 = 1;

/// What [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub steps: usize,
}

/// Runs `plan`'s steps against AWS. `live` is the observation the plan was made from.
#[allow(clippy::too_many_arguments)]
pub async fn apply(
    env: &AwsEnvironment,
    clients: &Clients,
    network: &Network,
    live: &Live,
    topology: &Topology,
    plan: &Plan,
    waits: Waits,
    report: &dyn Progress,
) -> Result<Applied, AwsError> {
    // Stand-alone servers where they really are (after a failover), for every server and
    // template rendered here.
    let placed = env.with_placements(crate::placement::placements(env, network, live));
    let ctx = context(&placed, clients, network, live, topology, waits, report);
    let mut applied = Applied::default();
    let mut deferred: Vec<&Step> = Vec::new();
    for wave in plan.waves() {
        let (now, later): (Vec<&Step>, Vec<&Step>) = wave.into_iter().partition(|step| {
            !(matches!(
                step.id.kind,
                ResourceKind::LaunchTemplate | ResourceKind::LaunchConfiguration
            ) && step.action == Action::Delete)
        });
        deferred.extend(later);
        // A group's server replacements run one after another; everything else at once.
        let mut lanes: BTreeMap<Option<String>, Vec<&Step>> = BTreeMap::new();
        for step in now {
            let lane = (step.id.kind == ResourceKind::GroupServer
                && step.action == Action::Replace)
                .then(|| group_of(&step.id.name).to_owned());
            lanes.entry(lane).or_default().push(step);
        }
        let mut futures = Vec::new();
        for (lane, steps) in lanes {
            match lane {
                Some(_) => futures.push(Box::pin(run_sequentially(&ctx, steps))
                    as std::pin::Pin<Box<dyn Future<Output = Vec<Result<(), AwsError>>> + Send>>),
                None => {
                    for step in steps {
                        futures.push(Box::pin(async { vec![run_step(&ctx, step).await] }));
                    }
                }
            }
        }
        let results: Vec<Result<(), AwsError>> = futures_util::future::join_all(futures)
            .await
            .into_iter()
            .flatten()
            .collect();
        for result in results {
            result?;
            applied.steps += 1;
        }
    }
    for step in deferred {
        run_step(&ctx, step).await?;
        applied.steps += 1;
    }
    Ok(applied)
}

/// Gives each of the environment's launch templates a new default version with its
/// user-data rendered again, for the same release, so that servers launched from now on
/// point at the database servers where they are now (after a failover). The servers running
/// are not replaced: a failover repoints them in place.
pub async fn rewrite_launch_templates(
    env: &AwsEnvironment,
    clients: &Clients,
    network: &Network,
    live: &Live,
    topology: &Topology,
    report: &dyn Progress,
) -> Result<Vec<String>, AwsError> {
    let placed = env.with_placements(crate::placement::placements(env, network, live));
    let ctx = context(
        &placed,
        clients,
        network,
        live,
        topology,
        Waits::default(),
        report,
    );
    let mut rewritten = Vec::new();
    for resource in topology
        .resources
        .iter()
        .filter(|r| r.id.kind == ResourceKind::LaunchTemplate)
    {
        let name = &resource.id.name;
        let Some(template) = live.launch_templates.get(name) else {
            continue;
        };
        let data = template_data(&ctx, resource, true).await?;
        new_default_version(clients, name, template, data).await?;
        rewritten.push(name.clone());
    }
    Ok(rewritten)
}

/// Adds a version with `data` to the launch template (from its default version) and makes it
/// the default, so the groups' next servers launch from it.
async fn new_default_version(
    clients: &Clients,
    name: &str,
    template: &crate::live::LiveLaunchTemplate,
    data: ec2::RequestLaunchTemplateData,
) -> Result<(), AwsError> {
    let created = clients
        .ec2
        .create_launch_template_version()
        .launch_template_id(&template.id)
        .source_version(template.default_version.to_string())
        .launch_template_data(data)
        .send()
        .await
        .op("CreateLaunchTemplateVersion", name)?;
    let version = created
        .launch_template_version()
        .and_then(|v| v.version_number())
        .unwrap_or(template.default_version + 1);
    clients
        .ec2
        .modify_launch_template()
        .launch_template_id(&template.id)
        .default_version(version.to_string())
        .send()
        .await
        .op("ModifyLaunchTemplate", name)?;
    Ok(())
}

async fn run_sequentially(ctx: &Ctx<'_>, steps: Vec<&Step>) -> Vec<Result<(), AwsError>> {
    let mut results = Vec::new();
    for step in steps {
        let result = run_step(ctx, step).await;
        let failed = result.is_err();
        results.push(result);
        if failed {
            break;
        }
    }
    results
}

/// `<prefix>-web[2]` -> `<prefix>-web`.
fn group_of(server: &str) -> &str {
    server.split_once('[').map_or(server, |(group, _)| group)
}

async fn run_step(ctx: &Ctx<'_>, step: &Step) -> Result<(), AwsError> {
    let verb = match step.action {
        Action::Create => "creating",
        Action::Update => "updating",
        Action::Replace => "replacing",
        Action::Delete => "deleting",
        Action::NoOp => return Ok(()),
    };
    ctx.say(&format!("{verb} {}", step.id));
    let desired = ctx.desired(&step.id);
    let result = match (step.id.kind, step.action, desired) {
        (ResourceKind::SecurityGroup, Action::Delete, _) => {
            delete_security_group(ctx, &step.id.name).await
        }
        (ResourceKind::SecurityGroup, Action::Replace, _) => Err(AwsError::precondition(
            "ReplaceSecurityGroup",
            &step.id.name,
            "its description differs from rigger's, and a group cannot be changed in place",
            "delete the group by hand (after `rigger down`, or detach it first) and run `rigger up` again",
        )),
        (ResourceKind::SecurityGroup, _, Some(resource)) => {
            ensure_security_group(ctx, resource).await
        }
        (ResourceKind::KeyPair, Action::Delete, _) => delete_key_pair(ctx, &step.id.name).await,
        (ResourceKind::KeyPair, action, Some(resource)) => {
            if action == Action::Replace {
                delete_key_pair(ctx, &step.id.name).await?;
            }
            ensure_key_pair(ctx, resource, action).await
        }
        (ResourceKind::InstanceProfile, Action::Delete, _) => {
            crate::iam::delete(ctx, &step.id.name).await
        }
        (ResourceKind::InstanceProfile, _, Some(resource)) => {
            crate::iam::ensure(ctx, resource).await
        }
        (ResourceKind::LaunchConfiguration, Action::Delete, _) => {
            delete_launch_configurations(ctx, &step.id.name).await
        }
        (ResourceKind::LaunchConfiguration, _, Some(resource)) => {
            create_launch_configuration(ctx, resource).await
        }
        (ResourceKind::LoadBalancer, Action::Delete, _) => {
            let lb = ctx.live.load_balancers.iter().find(|lb| {
                let kind = lb.kind.map(|k| k.to_string()).unwrap_or_default();
                step.id.name == ctx.env.names.load_balancer()
                    || step.id.name.ends_with(&format!("({kind})"))
            });
            match lb {
                Some(lb) => loadbalancer::delete(ctx, lb, &ctx.env.names.load_balancer()).await,
                None => Ok(()),
            }
        }
        (ResourceKind::LoadBalancer, action, Some(resource)) => {
            let live = ctx.live.load_balancer(ctx.env.aws().load_balancer);
            if action == Action::Replace
                && let Some(lb) = live
            {
                loadbalancer::delete(ctx, lb, &resource.id.name).await?;
                loadbalancer::ensure(ctx, resource, None).await
            } else {
                loadbalancer::ensure(ctx, resource, live).await
            }
        }
        (ResourceKind::LaunchTemplate, Action::Delete, _) => {
            delete_launch_template(ctx, &step.id.name).await
        }
        (ResourceKind::LaunchTemplate, _, Some(resource)) => {
            ensure_launch_template(ctx, resource, step).await
        }
        (ResourceKind::AutoScalingGroup, Action::Delete, _) => {
            delete_group(ctx, &step.id.name).await
        }
        (ResourceKind::AutoScalingGroup, _, Some(resource)) => ensure_group(ctx, resource).await,
        (ResourceKind::GroupServer, Action::Delete, _) => {
            // The group removes its own servers when its size goes down (or it is deleted).
            Ok(())
        }
        (ResourceKind::GroupServer, Action::Create, _) => fill_slot(ctx, &step.id.name).await,
        (ResourceKind::GroupServer, _, _) => replace_group_server(ctx, &step.id.name).await,
        (ResourceKind::Volume, Action::Delete, _) => delete_volume(ctx, &step.id.name).await,
        (ResourceKind::Volume, action, Some(resource)) => {
            ensure_volume(ctx, resource, action).await
        }
        (ResourceKind::Server, Action::Delete, _) => delete_server(ctx, &step.id.name).await,
        (ResourceKind::Server, action, Some(resource)) => {
            ensure_server(ctx, resource, action).await
        }
        (_, _, None) => Ok(()),
    };
    if let Err(error) = &result {
        tracing::warn!(step = %step.id, %error, "step failed");
    }
    result
}

// Security groups ------------------------------------------------------------------------

fn desired_set(resource: &Resource, name: &str) -> Vec<String> {
    match resource.attributes.get(name).map(|a| &a.value) {
        Some(Value::Set(items)) => items.iter().cloned().collect(),
        _ => Vec::new(),
    }
}

fn text<'r>(resource: &'r Resource, name: &str) -> Option<&'r str> {
    match resource.attributes.get(name).map(|a| &a.value) {
        Some(Value::Text(t)) => Some(t),
        _ => None,
    }
}

fn integer(resource: &Resource, name: &str) -> Option<i64> {
    match resource.attributes.get(name).map(|a| &a.value) {
        Some(Value::Integer(n)) => Some(*n),
        _ => None,
    }
}

/// `tcp/443 from sg:<name>` or `tcp/22 from 203.0.113.0/24` as a permission.
fn permission(ctx: &Ctx<'_>, rule: &str) -> Result<ec2::IpPermission, AwsError> {
    let bad = || {
        AwsError::precondition(
            "AuthorizeSecurityGroupIngress",
            rule,
            "rigger cannot read this rule",
            "this is a bug in rigger's topology; please report it",
        )
    };
    let (ports, source) = rule.split_once(" from ").ok_or_else(bad)?;
    let (protocol, port) = ports.split_once('/').ok_or_else(bad)?;
    let port: i32 = port.parse().map_err(|_| bad())?;
    let builder = ec2::IpPermission::builder()
        .ip_protocol(protocol)
        .from_port(port)
        .to_port(port);
    Ok(match source.strip_prefix("sg:") {
        Some(group) => builder
            .user_id_group_pairs(
                ec2::UserIdGroupPair::builder()
                    .group_id(ctx.sg_id(group)?)
                    .build(),
            )
            .build(),
        None => builder
            .ip_ranges(ec2::IpRange::builder().cidr_ip(source).build())
            .build(),
    })
}

async fn ensure_security_group(ctx: &Ctx<'_>, resource: &Resource) -> Result<(), AwsError> {
    let name = &resource.id.name;
    let live = ctx.live.security_groups.get(name);
    let id = match live {
        Some(group) => group.id.clone(),
        None => {
            let created = ctx
                .clients
                .ec2
                .create_security_group()
                .group_name(name)
                .description(text(resource, "description").unwrap_or("rigger"))
                .vpc_id(&ctx.network.vpc_id)
                .tag_specifications(ctx.ec2_tags(resource, ec2::ResourceType::SecurityGroup))
                .send()
                .await
                .op("CreateSecurityGroup", name)?;
            let id = created.group_id().unwrap_or_default().to_owned();
            ctx.security_groups
                .lock()
                .expect("not poisoned")
                .insert(name.clone(), id.clone());
            id
        }
    };
    let wanted = desired_set(resource, "ingress");
    let have: Vec<String> = live
        .map(|g| g.rules.keys().cloned().collect())
        .unwrap_or_default();
    let add = wanted
        .iter()
        .filter(|rule| !have.contains(rule))
        .map(|rule| permission(ctx, rule))
        .collect::<Result<Vec<_>, _>>()?;
    let remove: Vec<ec2::IpPermission> = live
        .map(|g| {
            g.rules
                .iter()
                .filter(|(rule, _)| !wanted.contains(rule))
                .map(|(_, permission)| permission.clone())
                .collect()
        })
        .unwrap_or_default();
    if !add.is_empty() {
        ctx.clients
            .ec2
            .authorize_security_group_ingress()
            .group_id(&id)
            .set_ip_permissions(Some(add))
            .send()
            .await
            .op("AuthorizeSecurityGroupIngress", name)?;
    }
    if !remove.is_empty() {
        ctx.clients
            .ec2
            .revoke_security_group_ingress()
            .group_id(&id)
            .set_ip_permissions(Some(remove))
            .send()
            .await
            .op("RevokeSecurityGroupIngress", name)?;
    }
    if let Some(group) = live {
        retag_ec2(ctx, resource, &group.id, &group.tags).await?;
    }
    Ok(())
}

/// Puts back the topology's tags on an existing EC2 resource when they differ.
async fn retag_ec2(
    ctx: &Ctx<'_>,
    resource: &Resource,
    id: &str,
    have: &BTreeMap<String, String>,
) -> Result<(), AwsError> {
    let differs = resource
        .tags
        .iter()
        .any(|(k, v)| k != tag::RELEASE && have.get(k) != Some(v));
    if !differs {
        return Ok(());
    }
    let mut request = ctx.clients.ec2.create_tags().resources(id);
    for (key, value) in ctx.tags(resource) {
        request = request.tags(ec2::Tag::builder().key(key).value(value).build());
    }
    request.send().await.op("CreateTags", &resource.id.name)?;
    Ok(())
}

async fn delete_security_group(ctx: &Ctx<'_>, name: &str) -> Result<(), AwsError> {
    let Some(group) = ctx.live.security_groups.get(name) else {
        return Ok(());
    };
    // Its rules go first: a rule naming another group keeps that group from being deleted.
    let rules: Vec<ec2::IpPermission> = group.rules.values().cloned().collect();
    if !rules.is_empty() {
        let revoked = ctx
            .clients
            .ec2
            .revoke_security_group_ingress()
            .group_id(&group.id)
            .set_ip_permissions(Some(rules))
            .send()
            .await
            .op("RevokeSecurityGroupIngress", name);
        match revoked {
            Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
            other => {
                other?;
            }
        }
    }
    retry_in_use(ctx, "DeleteSecurityGroup", name, || async {
        match ctx
            .clients
            .ec2
            .delete_security_group()
            .group_id(&group.id)
            .send()
            .await
            .op("DeleteSecurityGroup", name)
        {
            Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
            other => other.map(|_| ()),
        }
    })
    .await
}

// Launch templates -----------------------------------------------------------------------

fn role_of(resource: &Resource) -> rigger_recipes::Role {
    match resource.tags.get(tag::ROLE).map(String::as_str) {
        Some("worker") => rigger_recipes::Role::Worker,
        _ => rigger_recipes::Role::Web,
    }
}

/// The launch template data for `resource`. `with_user_data: false` leaves the user-data out:
/// a new version based on the current one (`SourceVersion`) inherits it.
async fn template_data(
    ctx: &Ctx<'_>,
    resource: &Resource,
    with_user_data: bool,
) -> Result<ec2::RequestLaunchTemplateData, AwsError> {
    let role = role_of(resource);
    let release = text(resource, "release").unwrap_or(&ctx.topology.release);
    let context = ctx.env.context(ctx.network, &[role], None, release);
    let user_data = userdata::user_data(ctx.env, &context, &userdata::DataVolume::Mapped).map_err(
        |problem| {
            AwsError::precondition(
                "CreateLaunchTemplate",
                &resource.id.name,
                problem,
                "this is a bug in rigger's recipes or user-data; please report it",
            )
        },
    )?;
    let groups = desired_set(resource, "security_groups")
        .iter()
        .map(|name| ctx.sg_id(name))
        .collect::<Result<Vec<_>, _>>()?;
    let mut instance_tags = ec2::LaunchTemplateTagSpecificationRequest::builder()
        .resource_type(ec2::ResourceType::Instance);
    let mut volume_tags = ec2::LaunchTemplateTagSpecificationRequest::builder()
        .resource_type(ec2::ResourceType::Volume);
    for (key, value) in &resource.tags {
        instance_tags = instance_tags.tags(ec2::Tag::builder().key(key).value(value).build());
        volume_tags = volume_tags.tags(ec2::Tag::builder().key(key).value(value).build());
    }
    let mut data = ec2::RequestLaunchTemplateData::builder()
        .set_image_id(text(resource, "image").map(str::to_owned))
        .set_instance_type(text(resource, "instance_type").map(ec2::InstanceType::from))
        .set_security_group_ids(Some(groups))
        .set_user_data(with_user_data.then_some(user_data))
        .metadata_options(
            ec2::LaunchTemplateInstanceMetadataOptionsRequest::builder()
                .http_tokens(ec2::LaunchTemplateHttpTokensState::Required)
                .http_put_response_hop_limit(METADATA_HOP_LIMIT)
                .build(),
        )
        .block_device_mappings(
            ec2::LaunchTemplateBlockDeviceMappingRequest::builder()
                .device_name(DATA_DEVICE)
                .ebs(
                    ec2::LaunchTemplateEbsBlockDeviceRequest::builder()
                        .volume_size(integer(resource, "volume_size_gib").unwrap_or(20) as i32)
                        .volume_type(ec2::VolumeType::Gp3)
                        .encrypted(true)
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        )
        .tag_specifications(instance_tags.build())
        .tag_specifications(volume_tags.build())
        .set_key_name(text(resource, "key_pair").map(str::to_owned));
    if let Some(profile) = text(resource, "instance_profile") {
        data = data.iam_instance_profile(
            ec2::LaunchTemplateIamInstanceProfileSpecificationRequest::builder()
                .name(profile)
                .build(),
        );
    }
    Ok(data.build())
}

async fn ensure_launch_template(
    ctx: &Ctx<'_>,
    resource: &Resource,
    step: &Step,
) -> Result<(), AwsError> {
    let name = &resource.id.name;
    match ctx.live.launch_templates.get(name) {
        None => {
            let data = template_data(ctx, resource, true).await?;
            let mut tags =
                ec2::TagSpecification::builder().resource_type(ec2::ResourceType::LaunchTemplate);
            for (key, value) in ctx.tags(resource) {
                tags = tags.tags(ec2::Tag::builder().key(key).value(value).build());
            }
            ctx.clients
                .ec2
                .create_launch_template()
                .launch_template_name(name)
                .launch_template_data(data)
                .tag_specifications(tags.build())
                .send()
                .await
                .op("CreateLaunchTemplate", name)?;
        }
        Some(live) => {
            // A new version based on the current one, made the default: the group launches
            // from `$Default`, so its next servers use it. An update (instance type) keeps the
            // user-data by inheriting it from `SourceVersion`; a replacement renders it anew.
            // Moto quirk: it ignores `SourceVersion` and keeps user-data given here as text it
            // cannot launch from, so leaving it out on an update is also what moto needs; every
            // other field is sent whole, which AWS merges to the same result.
            let data = template_data(ctx, resource, step.action == Action::Replace).await?;
            new_default_version(ctx.clients, name, live, data).await?;
            retag_ec2(ctx, resource, &live.id, &live.tags).await?;
            if step.action == Action::Replace {
                refresh_group_of_template(ctx, name).await?;
            }
        }
    }
    Ok(())
}

/// Rolls the servers of the group launching from template `name` onto its new default
/// version. Moto has no instance refresh: there the servers keep the old version, as an
/// instance-type change does everywhere until they are replaced.
async fn refresh_group_of_template(ctx: &Ctx<'_>, name: &str) -> Result<(), AwsError> {
    for (group, live) in &ctx.live.groups {
        if live.launch_template.as_deref() == Some(name) {
            refresh_group(ctx, group).await;
        }
    }
    Ok(())
}

/// Starts an instance refresh of `group`; a failure only warns (the servers keep what they
/// were launched from until they are replaced).
async fn refresh_group(ctx: &Ctx<'_>, group: &str) {
    let started = ctx
        .clients
        .autoscaling
        .start_instance_refresh()
        .auto_scaling_group_name(group)
        .send()
        .await
        .op("StartInstanceRefresh", group);
    if let Err(error) = started {
        ctx.say(&format!(
            "warning: {group}'s servers keep what they were launched from: {error}"
        ));
    }
}

async fn delete_launch_template(ctx: &Ctx<'_>, name: &str) -> Result<(), AwsError> {
    let Some(live) = ctx.live.launch_templates.get(name) else {
        return Ok(());
    };
    match ctx
        .clients
        .ec2
        .delete_launch_template()
        .launch_template_id(&live.id)
        .send()
        .await
        .op("DeleteLaunchTemplate", name)
    {
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
        other => other.map(|_| ()),
    }
}

// Key pairs -------------------------------------------------------------------------------

async fn ensure_key_pair(
    ctx: &Ctx<'_>,
    resource: &Resource,
    action: Action,
) -> Result<(), AwsError> {
    let name = &resource.id.name;
    let live = ctx.live.key_pairs.iter().find(|k| &k.name == name);
    if let (Some(key), Action::Update) = (live, action) {
        // Only its tags differ (a different key is a replacement).
        return retag_ec2(ctx, resource, &key.id, &key.tags).await;
    }
    let material = text(resource, "public_key").unwrap_or_default();
    let imported = ctx
        .clients
        .ec2
        .import_key_pair()
        .key_name(name)
        .public_key_material(aws_sdk_ec2::primitives::Blob::new(material.as_bytes()))
        .tag_specifications(ctx.ec2_tags(resource, ec2::ResourceType::KeyPair))
        .send()
        .await
        .op("ImportKeyPair", name);
    match imported {
        Err(error) if error.code() == Some("InvalidKeyPair.Duplicate") => {
            Err(AwsError::precondition(
                "ImportKeyPair",
                name,
                "a key pair of this name exists without the environment's tags, so it is not rigger's",
                "delete or rename it, or name it in `key_pair` (instead of `admin_public_key`) to use it as it is",
            ))
        }
        other => other.map(|_| ()),
    }
}

async fn delete_key_pair(ctx: &Ctx<'_>, name: &str) -> Result<(), AwsError> {
    if !ctx.live.key_pairs.iter().any(|k| k.name == name) {
        return Ok(());
    }
    match ctx
        .clients
        .ec2
        .delete_key_pair()
        .key_name(name)
        .send()
        .await
        .op("DeleteKeyPair", name)
    {
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
        other => other.map(|_| ()),
    }
}

// Launch configurations (legacy) -------------------------------------------------------------

/// Makes a new launch configuration for `resource` (they cannot be changed), points the
/// groups that used an older one of the same topology name at it, and deletes the older ones.
async fn create_launch_configuration(ctx: &Ctx<'_>, resource: &Resource) -> Result<(), AwsError> {
    let name = &resource.id.name;
    let role = role_of(resource);
    let release = text(resource, "release").unwrap_or(&ctx.topology.release);
    let mut aws_name = ctx.env.names.launch_configuration_on_aws(
        role,
        &rigger_plan::deploys::utc_timestamp(rigger_engine::clock::unix_now()),
        release,
    );
    if ctx
        .live
        .launch_configurations
        .iter()
        .any(|lc| lc.aws_name == aws_name)
    {
        // A replacement within the second its predecessor was made.
        tokio::time::sleep(Duration::from_secs(1)).await;
        aws_name = ctx.env.names.launch_configuration_on_aws(
            role,
            &rigger_plan::deploys::utc_timestamp(rigger_engine::clock::unix_now()),
            release,
        );
    }
    let context = ctx.env.context(ctx.network, &[role], None, release);
    let user_data = userdata::user_data(ctx.env, &context, &userdata::DataVolume::Mapped).map_err(
        |problem| {
            AwsError::precondition(
                "CreateLaunchConfiguration",
                name,
                problem,
                "this is a bug in rigger's recipes or user-data; please report it",
            )
        },
    )?;
    let groups = desired_set(resource, "security_groups")
        .iter()
        .map(|group| ctx.sg_id(group))
        .collect::<Result<Vec<_>, _>>()?;
    ctx.clients
        .autoscaling
        .create_launch_configuration()
        .launch_configuration_name(&aws_name)
        .set_image_id(text(resource, "image").map(str::to_owned))
        .set_instance_type(text(resource, "instance_type").map(str::to_owned))
        .set_security_groups(Some(groups))
        .set_key_name(text(resource, "key_pair").map(str::to_owned))
        .set_iam_instance_profile(text(resource, "instance_profile").map(str::to_owned))
        .user_data(user_data)
        .metadata_options(
            asg::InstanceMetadataOptions::builder()
                .http_tokens(asg::InstanceMetadataHttpTokensState::Required)
                .http_put_response_hop_limit(METADATA_HOP_LIMIT)
                .build(),
        )
        .block_device_mappings(
            asg::BlockDeviceMapping::builder()
                .device_name(DATA_DEVICE)
                .ebs(
                    asg::Ebs::builder()
                        .volume_size(integer(resource, "volume_size_gib").unwrap_or(20) as i32)
                        .volume_type("gp3")
                        .encrypted(true)
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .op("CreateLaunchConfiguration", &aws_name)?;
    ctx.launch_configurations
        .lock()
        .expect("not poisoned")
        .insert(name.clone(), aws_name.clone());

    let older: Vec<&str> = ctx
        .live
        .launch_configurations
        .iter()
        .filter(|lc| &lc.name == name)
        .map(|lc| lc.aws_name.as_str())
        .collect();
    if older.is_empty() {
        return Ok(());
    }
    for (group, live) in &ctx.live.groups {
        if !live
            .launch_configuration
            .as_deref()
            .is_some_and(|lc| older.contains(&lc))
        {
            continue;
        }
        ctx.clients
            .autoscaling
            .update_auto_scaling_group()
            .auto_scaling_group_name(group)
            .launch_configuration_name(&aws_name)
            .send()
            .await
            .op("UpdateAutoScalingGroup", group)?;
        refresh_group(ctx, group).await;
    }
    for old in older {
        delete_launch_configuration(ctx, old).await?;
    }
    Ok(())
}

/// Deletes the launch configurations the topology calls `name` (`<name> (<name on AWS>)` for
/// one alone).
async fn delete_launch_configurations(ctx: &Ctx<'_>, name: &str) -> Result<(), AwsError> {
    let names: Vec<&str> = match name.rsplit_once(" (") {
        Some((_, aws_name)) => vec![aws_name.trim_end_matches(')')],
        None => ctx
            .live
            .launch_configurations
            .iter()
            .filter(|lc| lc.name == name)
            .map(|lc| lc.aws_name.as_str())
            .collect(),
    };
    for aws_name in names {
        delete_launch_configuration(ctx, aws_name).await?;
    }
    Ok(())
}

async fn delete_launch_configuration(ctx: &Ctx<'_>, aws_name: &str) -> Result<(), AwsError> {
    let result = retry_in_use(ctx, "DeleteLaunchConfiguration", aws_name, || async {
        ctx.clients
            .autoscaling
            .delete_launch_configuration()
            .launch_configuration_name(aws_name)
            .send()
            .await
            .op("DeleteLaunchConfiguration", aws_name)
            .map(|_| ())
    })
    .await;
    match result {
        // Auto Scaling says a missing one is a validation error.
        Err(error)
            if error.kind() == ErrorKind::NotFound
                || (error.code() == Some("ValidationError")
                    && error.to_string().contains("not found")) =>
        {
            Ok(())
        }
        other => other,
    }
}

// Auto Scaling groups --------------------------------------------------------------------

async fn ensure_group(ctx: &Ctx<'_>, resource: &Resource) -> Result<(), AwsError> {
    use rigger_config::LoadBalancerKind;
    let name = &resource.id.name;
    let client = &ctx.clients.autoscaling;
    // A launch template's `$Default` version, or a launch configuration by its name on AWS.
    let template = text(resource, "launch_template").map(|name| {
        asg::LaunchTemplateSpecification::builder()
            .launch_template_name(name)
            .version("$Default")
            .build()
    });
    let configuration = match text(resource, "launch_configuration") {
        Some(name) => Some(
            ctx.launch_configurations
                .lock()
                .expect("not poisoned")
                .get(name)
                .cloned()
                .ok_or_else(|| {
                    AwsError::precondition(
                        "(lookup)",
                        format!("launch configuration {name}"),
                        "it does not exist",
                        "run `rigger up` again: it is created by an earlier step",
                    )
                })?,
        ),
        None => None,
    };
    let min = integer(resource, "min").unwrap_or(1) as i32;
    let max = integer(resource, "max").unwrap_or(1) as i32;
    let desired = integer(resource, "desired").unwrap_or(1) as i32;
    let health_check_type = text(resource, "health_check_type").unwrap_or("EC2");
    let wanted_lb = text(resource, "load_balancer");
    let kind = ctx.env.aws().load_balancer;
    // An application load balancer's target groups, read now: an earlier wave made them.
    let target_groups = match (wanted_lb, kind) {
        (Some(lb), LoadBalancerKind::Application) => {
            live_loadbalancer::read_application(ctx.clients, lb)
                .await?
                .map(|l| l.target_groups.into_values().collect::<Vec<_>>())
                .unwrap_or_default()
        }
        _ => Vec::new(),
    };
    let classic: Vec<String> = match (wanted_lb, kind) {
        (Some(lb), LoadBalancerKind::Classic) => vec![lb.to_owned()],
        _ => Vec::new(),
    };
    let subnets = ctx
        .network
        .subnets
        .iter()
        .map(|s| s.id.as_str())
        .collect::<Vec<_>>()
        .join(",");
    match ctx.live.groups.get(name) {
        None => {
            let mut request = client
                .create_auto_scaling_group()
                .auto_scaling_group_name(name)
                .set_launch_template(template)
                .set_launch_configuration_name(configuration)
                .min_size(min)
                .max_size(max)
                .desired_capacity(desired)
                .vpc_zone_identifier(subnets)
                .health_check_type(health_check_type)
                .health_check_grace_period(300)
                .set_load_balancer_names((!classic.is_empty()).then_some(classic))
                .set_target_group_arns((!target_groups.is_empty()).then_some(target_groups));
            for (key, value) in ctx.tags(resource) {
                request = request.tags(
                    asg::Tag::builder()
                        .key(key)
                        .value(value)
                        .propagate_at_launch(true)
                        .build(),
                );
            }
            request.send().await.op("CreateAutoScalingGroup", name)?;
        }
        Some(live) => {
            // The count is scaling's (the topology took it from the group): it is sent only
            // when the topology moved it into a changed min..max, so `up` never races the
            // policy.
            client
                .update_auto_scaling_group()
                .auto_scaling_group_name(name)
                .set_launch_template(template)
                .set_launch_configuration_name(configuration)
                .min_size(min)
                .max_size(max)
                .set_desired_capacity((i64::from(desired) != live.desired).then_some(desired))
                .health_check_type(health_check_type)
                .send()
                .await
                .op("UpdateAutoScalingGroup", name)?;
            let stale_classic = not_in(&live.load_balancer_names, &classic);
            if !stale_classic.is_empty() {
                client
                    .detach_load_balancers()
                    .auto_scaling_group_name(name)
                    .set_load_balancer_names(Some(stale_classic))
                    .send()
                    .await
                    .op("DetachLoadBalancers", name)?;
            }
            let new_classic = not_in(&classic, &live.load_balancer_names);
            if !new_classic.is_empty() {
                client
                    .attach_load_balancers()
                    .auto_scaling_group_name(name)
                    .set_load_balancer_names(Some(new_classic))
                    .send()
                    .await
                    .op("AttachLoadBalancers", name)?;
            }
            let stale_groups = not_in(&live.target_group_arns, &target_groups);
            if !stale_groups.is_empty() {
                client
                    .detach_load_balancer_target_groups()
                    .auto_scaling_group_name(name)
                    .set_target_group_arns(Some(stale_groups))
                    .send()
                    .await
                    .op("DetachLoadBalancerTargetGroups", name)?;
            }
            let new_groups = not_in(&target_groups, &live.target_group_arns);
            if !new_groups.is_empty() {
                client
                    .attach_load_balancer_target_groups()
                    .auto_scaling_group_name(name)
                    .set_target_group_arns(Some(new_groups))
                    .send()
                    .await
                    .op("AttachLoadBalancerTargetGroups", name)?;
            }
            let differs = resource
                .tags
                .iter()
                .any(|(k, v)| k != tag::RELEASE && live.tags.get(k) != Some(v));
            if differs {
                let mut request = client.create_or_update_tags();
                for (key, value) in ctx.tags(resource) {
                    request = request.tags(
                        asg::Tag::builder()
                            .resource_id(name)
                            .resource_type("auto-scaling-group")
                            .key(key)
                            .value(value)
                            .propagate_at_launch(true)
                            .build(),
                    );
                }
                request.send().await.op("CreateOrUpdateTags", name)?;
            }
        }
    }
    // The group follows demand between min and max.
    let target = integer(resource, "cpu_target").unwrap_or(50) as f64;
    client
        .put_scaling_policy()
        .auto_scaling_group_name(name)
        .policy_name(crate::live::policy_name(name))
        .policy_type("TargetTrackingScaling")
        .target_tracking_configuration(
            asg::TargetTrackingConfiguration::builder()
                .predefined_metric_specification(
                    asg::PredefinedMetricSpecification::builder()
                        .predefined_metric_type(asg::MetricType::AsgAverageCpuUtilization)
                        .build(),
                )
                .target_value(target)
                .build(),
        )
        .send()
        .await
        .op("PutScalingPolicy", name)?;
    Ok(())
}

async fn group_members(ctx: &Ctx<'_>, group: &str) -> Result<Option<(i32, Vec<String>)>, AwsError> {
    let answer = ctx
        .clients
        .autoscaling
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(group)
        .send()
        .await
        .op("DescribeAutoScalingGroups", group)?;
    Ok(answer.auto_scaling_groups().first().map(|g| {
        (
            g.desired_capacity().unwrap_or_default(),
            g.instances()
                .iter()
                .filter(|i| {
                    i.lifecycle_state().is_some_and(|s| {
                        s.as_str() == "InService" || s.as_str().starts_with("Pending")
                    })
                })
                .filter_map(|i| i.instance_id().map(str::to_owned))
                .collect(),
        )
    }))
}

/// Slot `<group>[n]` is empty: the group replaces lost servers itself; rigger asks it to
/// look again (moto only replaces when asked) and waits until the slot is filled.
async fn fill_slot(ctx: &Ctx<'_>, server: &str) -> Result<(), AwsError> {
    let group = group_of(server);
    let slot: usize = server
        .rsplit_once('[')
        .and_then(|(_, n)| n.trim_end_matches(']').parse().ok())
        .unwrap_or(1);
    let Some((desired, members)) = group_members(ctx, group).await? else {
        return Err(AwsError::precondition(
            "DescribeAutoScalingGroups",
            group,
            "the group does not exist",
            "run `rigger up` again",
        ));
    };
    if members.len() >= slot {
        return Ok(());
    }
    ctx.clients
        .autoscaling
        .set_desired_capacity()
        .auto_scaling_group_name(group)
        .desired_capacity(desired.max(slot as i32))
        .honor_cooldown(false)
        .send()
        .await
        .op("SetDesiredCapacity", group)?;
    ctx.wait_for(&format!("{server} to start"), || async {
        Ok(group_members(ctx, group)
            .await?
            .is_some_and(|(_, members)| members.len() >= slot))
    })
    .await
}

/// Terminates the server in slot `<group>[n]` without shrinking the group, which starts a
/// replacement from its current launch template; waits for the group to be whole again.
async fn replace_group_server(ctx: &Ctx<'_>, server: &str) -> Result<(), AwsError> {
    let group = group_of(server);
    let slot: usize = server
        .rsplit_once('[')
        .and_then(|(_, n)| n.trim_end_matches(']').parse().ok())
        .unwrap_or(1);
    let Some(live) = ctx.live.groups.get(group) else {
        return Ok(());
    };
    let Some(member) = live.instances.get(slot - 1) else {
        return fill_slot(ctx, server).await;
    };
    match ctx
        .clients
        .autoscaling
        .terminate_instance_in_auto_scaling_group()
        .instance_id(&member.id)
        .should_decrement_desired_capacity(false)
        .send()
        .await
        .op("TerminateInstanceInAutoScalingGroup", server)
    {
        Err(error) if error.kind() != ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let old = member.id.clone();
    ctx.wait_for(&format!("{server} to be replaced"), || async {
        Ok(group_members(ctx, group)
            .await?
            .is_some_and(|(desired, members)| {
                !members.contains(&old) && members.len() >= desired as usize
            }))
    })
    .await
}

async fn delete_group(ctx: &Ctx<'_>, name: &str) -> Result<(), AwsError> {
    // AWS deletes a group's policies with it; moto keeps them, so rigger deletes its own.
    if ctx
        .live
        .groups
        .get(name)
        .is_some_and(|g| g.cpu_target.is_some())
    {
        let deleted = ctx
            .clients
            .autoscaling
            .delete_policy()
            .auto_scaling_group_name(name)
            .policy_name(crate::live::policy_name(name))
            .send()
            .await
            .op("DeletePolicy", name);
        match deleted {
            Err(error) if error.kind() != ErrorKind::NotFound => return Err(error),
            _ => {}
        }
    }
    match ctx
        .clients
        .autoscaling
        .delete_auto_scaling_group()
        .auto_scaling_group_name(name)
        .force_delete(true)
        .send()
        .await
        .op("DeleteAutoScalingGroup", name)
    {
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
        other => {
            other?;
        }
    }
    let instances: Vec<String> = ctx
        .live
        .groups
        .get(name)
        .map(|g| g.instances.iter().map(|i| i.id.clone()).collect())
        .unwrap_or_default();
    ctx.wait_for(&format!("group {name} to be deleted"), || async {
        Ok(group_members(ctx, name).await?.is_none())
    })
    .await?;
    wait_terminated(ctx, name, &instances).await
}

async fn wait_terminated(ctx: &Ctx<'_>, what: &str, instances: &[String]) -> Result<(), AwsError> {
    if instances.is_empty() {
        return Ok(());
    }
    ctx.wait_for(&format!("the servers of {what} to terminate"), || async {
        let answer = ctx
            .clients
            .ec2
            .describe_instances()
            .set_instance_ids(Some(instances.to_vec()))
            .send()
            .await
            .op("DescribeInstances", what);
        let answer = match answer {
            Err(error) if error.kind() == ErrorKind::NotFound => return Ok(true),
            other => other?,
        };
        Ok(answer
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .all(|i| {
                i.state()
                    .and_then(|s| s.name())
                    .is_some_and(|s| *s == ec2::InstanceStateName::Terminated)
            }))
    })
    .await
}

// Volumes and stand-alone servers --------------------------------------------------------

async fn ensure_volume(ctx: &Ctx<'_>, resource: &Resource, action: Action) -> Result<(), AwsError> {
    let name = &resource.id.name;
    let size = integer(resource, "size_gib").unwrap_or(20) as i32;
    let volume_type = ec2::VolumeType::from(text(resource, "volume_type").unwrap_or("gp3"));
    let live = ctx.live.volume(name);
    if let Some(volume) = live {
        if action == Action::Replace {
            delete_volume(ctx, name).await?;
        } else {
            if i64::from(size) != volume.size || volume_type.as_str() != volume.volume_type {
                ctx.clients
                    .ec2
                    .modify_volume()
                    .volume_id(&volume.id)
                    .size(size.max(volume.size as i32))
                    .volume_type(volume_type)
                    .send()
                    .await
                    .op("ModifyVolume", name)?;
            }
            return retag_ec2(ctx, resource, &volume.id, &volume.tags).await;
        }
    }
    // The volume lives in the zone of the server that mounts it.
    let server = name.strip_suffix("-data").unwrap_or(name);
    let zone = ctx
        .stand_alone(server)
        .and_then(|s| ctx.network.subnets.get(s.subnet))
        .or(ctx.network.subnets.first())
        .map(|s| s.zone.clone())
        .unwrap_or_default();
    let created = ctx
        .clients
        .ec2
        .create_volume()
        .availability_zone(zone)
        .size(size)
        .volume_type(volume_type)
        .encrypted(true)
        .tag_specifications(ctx.ec2_tags(resource, ec2::ResourceType::Volume))
        .send()
        .await
        .op("CreateVolume", name)?;
    let id = created.volume_id().unwrap_or_default().to_owned();
    ctx.volumes
        .lock()
        .expect("not poisoned")
        .insert(name.clone(), id.clone());
    ctx.wait_for(&format!("volume {name} to be available"), || async {
        Ok(volume_state(ctx, &id, name).await?.as_deref() == Some("available"))
    })
    .await
}

async fn volume_state(ctx: &Ctx<'_>, id: &str, name: &str) -> Result<Option<String>, AwsError> {
    let answer = ctx
        .clients
        .ec2
        .describe_volumes()
        .volume_ids(id)
        .send()
        .await
        .op("DescribeVolumes", name);
    match answer {
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(None),
        other => Ok(other?
            .volumes()
            .first()
            .and_then(|v| v.state())
            .map(|s| s.as_str().to_owned())),
    }
}

async fn delete_volume(ctx: &Ctx<'_>, name: &str) -> Result<(), AwsError> {
    let (base, explicit_id) = match name.rsplit_once(" (") {
        Some((base, id)) => (base, Some(id.trim_end_matches(')').to_owned())),
        None => (name, None),
    };
    let Some(id) = explicit_id.or_else(|| ctx.live.volume(base).map(|v| v.id.clone())) else {
        return Ok(());
    };
    // Its server was terminated by an earlier step; the volume detaches on its own.
    ctx.wait_for(&format!("volume {name} to be detached"), || async {
        Ok(matches!(
            volume_state(ctx, &id, name).await?.as_deref(),
            Some("available") | None
        ))
    })
    .await?;
    match ctx
        .clients
        .ec2
        .delete_volume()
        .volume_id(&id)
        .send()
        .await
        .op("DeleteVolume", name)
    {
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
        other => other.map(|_| ()),
    }
}

async fn ensure_server(ctx: &Ctx<'_>, resource: &Resource, action: Action) -> Result<(), AwsError> {
    let name = &resource.id.name;
    let live = ctx.live.server(name);
    match (live, action) {
        (Some(_), Action::Replace) => {
            // The interface (and so the address) and the data volume stay for the new one.
            terminate_server(ctx, name).await?;
            create_server(ctx, resource).await
        }
        (Some(instance), _) => update_server(ctx, resource, instance).await,
        (None, _) => create_server(ctx, resource).await,
    }
}

async fn create_server(ctx: &Ctx<'_>, resource: &Resource) -> Result<(), AwsError> {
    let name = &resource.id.name;
    let server = ctx.stand_alone(name).ok_or_else(|| {
        AwsError::precondition(
            "RunInstances",
            name,
            "the configuration does not describe this server",
            "this is a bug in rigger; please report it",
        )
    })?;
    let subnet = &ctx.network.subnets[server.subnet];
    let groups = desired_set(resource, "security_groups")
        .iter()
        .map(|group| ctx.sg_id(group))
        .collect::<Result<Vec<_>, _>>()?;
    let interface = ensure_interface(ctx, resource, &server, &subnet.id, &groups).await?;
    // Its certificate, signed here so that no server ever needs the CA's key: the server
    // reads it at boot with its role's profile.
    crate::secrets::issue_server_certificate(ctx.env, ctx.clients, &server.id, server.address)
        .await?;
    let context = ctx.env.context(
        ctx.network,
        &server.roles,
        Some(&server),
        &ctx.topology.release,
    );
    // The volume rigger attaches after launch: the server finds it by this id.
    let volume = data_volume_id(ctx, resource, "RunInstances")?;
    let user_data = userdata::user_data(
        ctx.env,
        &context,
        &userdata::DataVolume::Attached(volume.clone()),
    )
    .map_err(|problem| {
        AwsError::precondition(
            "RunInstances",
            name,
            problem,
            "this is a bug in rigger's recipes or user-data; please report it",
        )
    })?;
    let roles: Vec<&str> = server.roles.iter().map(|r| r.as_str()).collect();
    let mut tags = ctx.tags(resource);
    tags.push((ROLES_TAG.into(), roles.join(",")));
    // Its recipe id, which its certificate and replication slot name: it stays when a
    // failover renames the server (crate::database).
    tags.push((crate::tags::SERVER_TAG.into(), server.id.clone()));
    let mut spec = ec2::TagSpecification::builder().resource_type(ec2::ResourceType::Instance);
    for (key, value) in tags {
        spec = spec.tags(ec2::Tag::builder().key(key).value(value).build());
    }
    let mut request = ctx
        .clients
        .ec2
        .run_instances()
        .set_image_id(text(resource, "image").map(str::to_owned))
        .set_instance_type(text(resource, "instance_type").map(ec2::InstanceType::from))
        .min_count(1)
        .max_count(1)
        .network_interfaces(
            ec2::InstanceNetworkInterfaceSpecification::builder()
                .device_index(0)
                .network_interface_id(&interface)
                .build(),
        )
        .user_data(user_data)
        .metadata_options(
            ec2::InstanceMetadataOptionsRequest::builder()
                .http_tokens(ec2::HttpTokensState::Required)
                .http_put_response_hop_limit(METADATA_HOP_LIMIT)
                .build(),
        )
        .tag_specifications(spec.build())
        .set_key_name(text(resource, "key_pair").map(str::to_owned));
    if let Some(profile) = text(resource, "instance_profile") {
        request = request.iam_instance_profile(
            ec2::IamInstanceProfileSpecification::builder()
                .name(profile)
                .build(),
        );
    }
    // A new instance profile takes a few seconds to reach EC2, which until then calls it
    // invalid: retried until the timeout.
    let started_at = std::time::Instant::now();
    let started = loop {
        match request.clone().send().await.op("RunInstances", name) {
            Err(error)
                if error.code() == Some("InvalidParameterValue")
                    && error
                        .to_string()
                        .to_ascii_lowercase()
                        .contains("instance profile")
                    && started_at.elapsed() < ctx.waits.timeout =>
            {
                tracing::info!(server = %name, "instance profile not visible yet; retrying");
                tokio::time::sleep(ctx.waits.poll).await;
            }
            other => break other?,
        }
    };
    let id = started
        .instances()
        .first()
        .and_then(|i| i.instance_id())
        .unwrap_or_default()
        .to_owned();
    wait_instance_state(ctx, name, &id, ec2::InstanceStateName::Running).await?;
    attach_volume(ctx, name, &id, &volume).await?;
    Ok(())
}

/// The server's network interface, with its fixed address: found by name, or created. It
/// outlives the instance, so a replaced server keeps its address. (Moto also never frees the
/// address of a terminated instance; reusing the interface avoids that too.)
async fn ensure_interface(
    ctx: &Ctx<'_>,
    resource: &Resource,
    server: &StandAlone,
    subnet: &str,
    groups: &[String],
) -> Result<String, AwsError> {
    let name = crate::live::interface_name(&resource.id.name);
    if let Some(live) = ctx.live.interface(&resource.id.name) {
        ctx.clients
            .ec2
            .modify_network_interface_attribute()
            .network_interface_id(&live.id)
            .set_groups(Some(groups.to_vec()))
            .send()
            .await
            .op("ModifyNetworkInterfaceAttribute", &name)?;
        return Ok(live.id.clone());
    }
    let mut spec =
        ec2::TagSpecification::builder().resource_type(ec2::ResourceType::NetworkInterface);
    for (key, value) in ctx.tags(resource) {
        let value = if key == "Name" { name.clone() } else { value };
        spec = spec.tags(ec2::Tag::builder().key(key).value(value).build());
    }
    // The interface outlives its instance: the recipe id it holds the address for goes with it.
    spec = spec.tags(
        ec2::Tag::builder()
            .key(crate::tags::SERVER_TAG)
            .value(&server.id)
            .build(),
    );
    let created = ctx
        .clients
        .ec2
        .create_network_interface()
        .subnet_id(subnet)
        .private_ip_address(server.address.to_string())
        .set_groups(Some(groups.to_vec()))
        .description(format!("rigger: {}", resource.id.name))
        .tag_specifications(spec.build())
        .send()
        .await
        .op("CreateNetworkInterface", &name)?;
    Ok(created
        .network_interface()
        .and_then(|n| n.network_interface_id())
        .unwrap_or_default()
        .to_owned())
}

/// Deletes a network interface, waiting while it is still attached to a terminating server.
pub(crate) async fn delete_interface(ctx: &Ctx<'_>, id: &str, name: &str) -> Result<(), AwsError> {
    let result = retry_in_use(ctx, "DeleteNetworkInterface", name, || async {
        ctx.clients
            .ec2
            .delete_network_interface()
            .network_interface_id(id)
            .send()
            .await
            .op("DeleteNetworkInterface", name)
            .map(|_| ())
    })
    .await;
    match result {
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Deletes an interface whose server is gone (`down` after an interrupted run).
pub async fn delete_orphan_interface(
    clients: &Clients,
    interface: &crate::live::LiveInterface,
    waits: Waits,
) -> Result<(), AwsError> {
    let started = std::time::Instant::now();
    loop {
        match clients
            .ec2
            .delete_network_interface()
            .network_interface_id(&interface.id)
            .send()
            .await
            .op("DeleteNetworkInterface", &interface.name)
        {
            Err(error)
                if error.kind() == ErrorKind::DependencyViolation
                    && started.elapsed() < waits.timeout =>
            {
                tokio::time::sleep(waits.poll).await;
            }
            Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
            other => return other.map(|_| ()),
        }
    }
}

/// The id of the data volume of stand-alone server `resource` (its `data_volume`), created
/// by an earlier step; `operation` names the call that needs it in errors.
fn data_volume_id(
    ctx: &Ctx<'_>,
    resource: &Resource,
    operation: &'static str,
) -> Result<String, AwsError> {
    let volume = text(resource, "data_volume").unwrap_or_default();
    ctx.volumes
        .lock()
        .expect("not poisoned")
        .get(volume)
        .cloned()
        .ok_or_else(|| {
            AwsError::precondition(
                operation,
                &resource.id.name,
                format!("its data volume {volume} does not exist"),
                "run `rigger up` again: the volume is created by an earlier step",
            )
        })
}

/// Attaches the data volume whose id is `volume_id` to `instance`, the stand-alone server
/// `server`, at the device the boot script looks for on Xen instances.
async fn attach_volume(
    ctx: &Ctx<'_>,
    server: &str,
    instance: &str,
    volume_id: &str,
) -> Result<(), AwsError> {
    ctx.clients
        .ec2
        .attach_volume()
        .volume_id(volume_id)
        .instance_id(instance)
        .device(DATA_DEVICE)
        .send()
        .await
        .op("AttachVolume", format!("{volume_id} to {server}"))?;
    Ok(())
}

async fn instance_state(
    ctx: &Ctx<'_>,
    name: &str,
    id: &str,
) -> Result<Option<ec2::InstanceStateName>, AwsError> {
    let answer = ctx
        .clients
        .ec2
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .op("DescribeInstances", name);
    match answer {
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(None),
        other => Ok(other?
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find_map(|i| i.state().and_then(|s| s.name()).cloned())),
    }
}

async fn wait_instance_state(
    ctx: &Ctx<'_>,
    name: &str,
    id: &str,
    wanted: ec2::InstanceStateName,
) -> Result<(), AwsError> {
    ctx.wait_for(&format!("{name} to be {}", wanted.as_str()), || async {
        let state = instance_state(ctx, name, id).await?;
        Ok(match &wanted {
            ec2::InstanceStateName::Terminated => {
                state.is_none() || state == Some(ec2::InstanceStateName::Terminated)
            }
            other => state.as_ref() == Some(other),
        })
    })
    .await
}

async fn update_server(
    ctx: &Ctx<'_>,
    resource: &Resource,
    instance: &crate::live::LiveInstance,
) -> Result<(), AwsError> {
    let name = &resource.id.name;
    let groups = desired_set(resource, "security_groups")
        .iter()
        .map(|group| ctx.sg_id(group))
        .collect::<Result<Vec<_>, _>>()?;
    let mut have = instance.security_group_ids.clone();
    have.sort();
    let mut want = groups.clone();
    want.sort();
    if have != want {
        match &instance.primary_interface {
            Some(interface) => {
                ctx.clients
                    .ec2
                    .modify_network_interface_attribute()
                    .network_interface_id(interface)
                    .set_groups(Some(want))
                    .send()
                    .await
                    .op("ModifyNetworkInterfaceAttribute", name)?;
            }
            None => {
                ctx.clients
                    .ec2
                    .modify_instance_attribute()
                    .instance_id(&instance.id)
                    .set_groups(Some(want))
                    .send()
                    .await
                    .op("ModifyInstanceAttribute (security groups)", name)?;
            }
        }
    }
    if let Some(instance_type) = text(resource, "instance_type")
        && instance_type != instance.instance_type
    {
        // The type changes only while the server is stopped; its data volume stays.
        ctx.say(&format!(
            "stopping {name} to change its type to {instance_type}"
        ));
        ctx.clients
            .ec2
            .stop_instances()
            .instance_ids(&instance.id)
            .send()
            .await
            .op("StopInstances", name)?;
        wait_instance_state(ctx, name, &instance.id, ec2::InstanceStateName::Stopped).await?;
        ctx.clients
            .ec2
            .modify_instance_attribute()
            .instance_id(&instance.id)
            .instance_type(ec2::AttributeValue::builder().value(instance_type).build())
            .send()
            .await
            .op("ModifyInstanceAttribute (instance type)", name)?;
        ctx.clients
            .ec2
            .start_instances()
            .instance_ids(&instance.id)
            .send()
            .await
            .op("StartInstances", name)?;
        wait_instance_state(ctx, name, &instance.id, ec2::InstanceStateName::Running).await?;
    }
    if let Some(volume) = text(resource, "data_volume") {
        let attached = ctx
            .live
            .volume(volume)
            .is_some_and(|v| v.attached_to.as_deref() == Some(instance.id.as_str()));
        if !attached {
            let volume_id = data_volume_id(ctx, resource, "AttachVolume")?;
            attach_volume(ctx, name, &instance.id, &volume_id).await?;
        }
    }
    if let Some(profile) = text(resource, "instance_profile")
        && instance.instance_profile.as_deref() != Some(profile)
    {
        set_instance_profile(ctx, name, &instance.id, profile).await?;
    }
    retag_ec2(ctx, resource, &instance.id, &instance.tags).await
}

/// Gives a running server instance profile `profile`, replacing the one it has.
async fn set_instance_profile(
    ctx: &Ctx<'_>,
    name: &str,
    instance: &str,
    profile: &str,
) -> Result<(), AwsError> {
    let spec = ec2::IamInstanceProfileSpecification::builder()
        .name(profile)
        .build();
    let associations = ctx
        .clients
        .ec2
        .describe_iam_instance_profile_associations()
        .filters(filter("instance-id", [instance]))
        .send()
        .await
        .op("DescribeIamInstanceProfileAssociations", name)?;
    let current = associations
        .iam_instance_profile_associations()
        .iter()
        .find(|a| {
            a.state().is_some_and(|s| {
                matches!(
                    s,
                    ec2::IamInstanceProfileAssociationState::Associated
                        | ec2::IamInstanceProfileAssociationState::Associating
                )
            })
        })
        .and_then(|a| a.association_id());
    match current {
        Some(association) => {
            ctx.clients
                .ec2
                .replace_iam_instance_profile_association()
                .association_id(association)
                .iam_instance_profile(spec)
                .send()
                .await
                .op("ReplaceIamInstanceProfileAssociation", name)?;
        }
        None => {
            ctx.clients
                .ec2
                .associate_iam_instance_profile()
                .instance_id(instance)
                .iam_instance_profile(spec)
                .send()
                .await
                .op("AssociateIamInstanceProfile", name)?;
        }
    }
    Ok(())
}

/// Terminates the server and deletes its network interface.
async fn delete_server(ctx: &Ctx<'_>, name: &str) -> Result<(), AwsError> {
    terminate_server(ctx, name).await?;
    if !name.contains(" (")
        && let Some(interface) = ctx.live.interface(name)
    {
        delete_interface(ctx, &interface.id, &crate::live::interface_name(name)).await?;
    }
    Ok(())
}

async fn terminate_server(ctx: &Ctx<'_>, name: &str) -> Result<(), AwsError> {
    let id = match name.rsplit_once(" (") {
        Some((_, id)) => Some(id.trim_end_matches(')').to_owned()),
        None => ctx.live.server(name).map(|i| i.id.clone()),
    };
    let Some(id) = id else {
        return Ok(());
    };
    match ctx
        .clients
        .ec2
        .terminate_instances()
        .instance_ids(&id)
        .send()
        .await
        .op("TerminateInstances", name)
    {
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
        other => {
            other?;
        }
    }
    wait_instance_state(ctx, name, &id, ec2::InstanceStateName::Terminated).await
}

/// Instances of the environment that are still shutting down (their security groups cannot
/// be deleted yet). Used by `down` to report progress.
pub async fn shutting_down(env: &AwsEnvironment, clients: &Clients) -> Result<usize, AwsError> {
    let answer = clients
        .ec2
        .describe_instances()
        .filters(filter(&format!("tag:{}", tag::PROJECT), [env.project()]))
        .filters(filter(
            &format!("tag:{}", tag::ENVIRONMENT),
            [env.name.as_str()],
        ))
        .filters(filter("instance-state-name", ["shutting-down"]))
        .send()
        .await
        .op("DescribeInstances", "(shutting down)")?;
    Ok(answer
        .reservations()
        .iter()
        .map(|r| r.instances().len())
        .sum())
}

/// The names in `these` that `those` lacks (what to attach, or to detach).
fn not_in(these: &[String], those: &[String]) -> Vec<String> {
    these
        .iter()
        .filter(|name| !those.contains(name))
        .cloned()
        .collect()
}
