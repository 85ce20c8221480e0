//! The load balancer, classic or application, read ([`read_classic`], [`read_application`])
//! and converged to the topology ([`ensure`]): listeners 80->80 HTTP and 443->443 HTTPS with
//! the certificate and a TLS policy of TLS 1.2 and later (`rigger_topology::tls_policy`), the
//! health check `HTTPS:443<path>`, connection draining and cross-zone.
//!
//! A classic load balancer takes its TLS policy as a listener policy of its own
//! (`rigger-<predefined policy>`, of type `SSLNegotiationPolicyType`) that references the
//! predefined one; an application load balancer's HTTPS listener names it (`SslPolicy`).
//!
//! An application load balancer gets two target groups, `<lb>-443` (HTTPS) and `<lb>-80`
//! (HTTP), so each listener forwards to the same port on the instances as a classic one would;
//! both check health over HTTPS on 443 at the health path.
//!
//! Emulator quirks handled here: moto answers HTTP 500 to DescribeLoadBalancerAttributes for a
//! classic load balancer that does not exist (only asked after the load balancer was found),
//! and leaves a new classic load balancer without health check (rigger always configures one
//! right after creating it; a missing one is observed as absent, which the planner repairs).

use std::collections::BTreeMap;

use aws_sdk_elasticloadbalancing as elb;
use aws_sdk_elasticloadbalancingv2 as elbv2;
use rigger_config::LoadBalancerKind;
use rigger_topology::{Resource, Value};

use crate::Clients;
use crate::context::{Ctx, retry_in_use};
use crate::error::{AwsError, Context as _};
use crate::live_loadbalancer::{
    LiveLoadBalancer, REFERENCE_POLICY, TLS_POLICY_TYPE, classic_policy_name,
};

use rigger_topology::health_check::{
    HEALTHY_THRESHOLD, INTERVAL_SECONDS as HEALTH_INTERVAL, TIMEOUT_SECONDS as HEALTH_TIMEOUT,
    UNHEALTHY_THRESHOLD,
};

/// Whether the live load balancer's health check is the wanted one: its target and its timing
/// (a changed interval or threshold is applied to an existing load balancer too).
fn health_check_matches(live: Option<&LiveLoadBalancer>, wanted: &Wanted) -> bool {
    live.is_some_and(|l| {
        l.health_check.as_deref() == Some(wanted.health_check.as_str())
            && l.health_check_timing.as_deref() == Some(wanted.health_check_timing.as_str())
    })
}

/// What the topology asks of the load balancer, parsed from its attributes.
struct Wanted {
    listeners: Vec<(i32, i32, String)>,
    health_check: String,
    health_check_timing: String,
    health_path: String,
    certificate: Option<String>,
    tls_policy: Option<String>,
    security_groups: Vec<String>,
    cross_zone: bool,
    draining: i64,
}

fn wanted(ctx: &Ctx<'_>, resource: &Resource) -> Result<Wanted, AwsError> {
    let text = |name: &str| match resource.attributes.get(name).map(|a| &a.value) {
        Some(Value::Text(t)) => Some(t.clone()),
        _ => None,
    };
    let listeners = match resource.attributes.get("listeners").map(|a| &a.value) {
        Some(Value::List(items)) => items
            .iter()
            .filter_map(|item| match item {
                Value::Text(t) => parse_listener(t),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let health_check = text("health_check").unwrap_or_default();
    let health_path = health_check
        .find('/')
        .map_or("/".to_owned(), |i| health_check[i..].to_owned());
    let security_groups = match resource.attributes.get("security_groups").map(|a| &a.value) {
        Some(Value::Set(names)) => names
            .iter()
            .map(|n| ctx.sg_id(n))
            .collect::<Result<Vec<_>, _>>()?,
        _ => Vec::new(),
    };
    Ok(Wanted {
        listeners,
        health_check_timing: text("health_check_timing")
            .unwrap_or_else(rigger_topology::health_check::wanted_timing),
        health_check,
        health_path,
        certificate: text("certificate"),
        tls_policy: text("tls_policy"),
        security_groups,
        cross_zone: matches!(
            resource.attributes.get("cross_zone").map(|a| &a.value),
            Some(Value::Bool(true))
        ),
        draining: match resource
            .attributes
            .get("connection_draining_seconds")
            .map(|a| &a.value)
        {
            Some(Value::Integer(n)) => *n,
            _ => 0,
        },
    })
}

/// `443->443 HTTPS` -> (443, 443, "HTTPS").
fn parse_listener(text: &str) -> Option<(i32, i32, String)> {
    let (ports, protocol) = text.split_once(' ')?;
    let (from, to) = ports.split_once("->")?;
    Some((from.parse().ok()?, to.parse().ok()?, protocol.to_owned()))
}

/// Creates the load balancer if it is missing and converges every attribute.
pub(crate) async fn ensure(
    ctx: &Ctx<'_>,
    resource: &Resource,
    live: Option<&LiveLoadBalancer>,
) -> Result<(), AwsError> {
    let wanted = wanted(ctx, resource)?;
    if wanted
        .listeners
        .iter()
        .any(|(_, _, protocol)| protocol == "HTTPS")
        && wanted.certificate.is_none()
    {
        return Err(AwsError::precondition(
            "CreateLoadBalancer",
            &resource.id.name,
            "the HTTPS listener needs a certificate",
            "set `certificate` to the ARN of an ACM or IAM server certificate in rigger.toml",
        ));
    }
    match ctx.env.aws().load_balancer {
        LoadBalancerKind::Classic => ensure_classic(ctx, resource, &wanted, live).await,
        LoadBalancerKind::Application => ensure_application(ctx, resource, &wanted, live).await,
    }
}

async fn ensure_classic(
    ctx: &Ctx<'_>,
    resource: &Resource,
    wanted: &Wanted,
    live: Option<&LiveLoadBalancer>,
) -> Result<(), AwsError> {
    let name = resource.id.name.as_str();
    let client = &ctx.clients.elb;
    let listener = |(from, to, protocol): &(i32, i32, String)| {
        let mut builder = elb::types::Listener::builder()
            .protocol(protocol)
            .load_balancer_port(*from)
            .instance_protocol(protocol)
            .instance_port(*to);
        if protocol == "HTTPS" {
            builder = builder.set_ssl_certificate_id(wanted.certificate.clone());
        }
        builder.build().expect("every required field is set")
    };
    // Whether the HTTPS listener is new (a new listener has the default TLS policy).
    let mut https_listener_made = false;
    match live {
        None => {
            https_listener_made = true;
            let mut request = client
                .create_load_balancer()
                .load_balancer_name(name)
                .set_listeners(Some(wanted.listeners.iter().map(listener).collect()))
                .set_subnets(Some(
                    ctx.network.subnets.iter().map(|s| s.id.clone()).collect(),
                ))
                .set_security_groups(Some(wanted.security_groups.clone()));
            for (key, value) in ctx.tags(resource) {
                request = request.tags(
                    elb::types::Tag::builder()
                        .key(key)
                        .value(value)
                        .build()
                        .expect("key is set"),
                );
            }
            request
                .send()
                .await
                .op("CreateLoadBalancer (classic)", name)?;
        }
        Some(live) => {
            let have: Vec<Option<(i32, i32, String)>> =
                live.listeners.iter().map(|l| parse_listener(l)).collect();
            let stale: Vec<i32> = have
                .iter()
                .flatten()
                .filter(|l| !wanted.listeners.contains(l))
                .map(|l| l.0)
                .collect();
            if !stale.is_empty() {
                client
                    .delete_load_balancer_listeners()
                    .load_balancer_name(name)
                    .set_load_balancer_ports(Some(stale))
                    .send()
                    .await
                    .op("DeleteLoadBalancerListeners", name)?;
            }
            let missing: Vec<elb::types::Listener> = wanted
                .listeners
                .iter()
                .filter(|l| !have.iter().flatten().any(|h| h == *l))
                .map(listener)
                .collect();
            if !missing.is_empty() {
                https_listener_made = missing.iter().any(|l| l.protocol() == "HTTPS");
                client
                    .create_load_balancer_listeners()
                    .load_balancer_name(name)
                    .set_listeners(Some(missing))
                    .send()
                    .await
                    .op("CreateLoadBalancerListeners", name)?;
            } else if wanted.certificate.is_some() && live.certificate != wanted.certificate {
                client
                    .set_load_balancer_listener_ssl_certificate()
                    .load_balancer_name(name)
                    .load_balancer_port(443)
                    .set_ssl_certificate_id(wanted.certificate.clone())
                    .send()
                    .await
                    .op("SetLoadBalancerListenerSSLCertificate", name)?;
            }
            let mut have_groups = live.security_group_ids.clone();
            have_groups.sort();
            let mut want_groups = wanted.security_groups.clone();
            want_groups.sort();
            if have_groups != want_groups {
                client
                    .apply_security_groups_to_load_balancer()
                    .load_balancer_name(name)
                    .set_security_groups(Some(want_groups))
                    .send()
                    .await
                    .op("ApplySecurityGroupsToLoadBalancer", name)?;
            }
        }
    }
    let https_port = wanted
        .listeners
        .iter()
        .find(|(_, _, protocol)| protocol == "HTTPS")
        .map(|(from, _, _)| *from);
    if let (Some(policy), Some(port)) = (&wanted.tls_policy, https_port)
        && (https_listener_made || live.and_then(|l| l.tls_policy.as_ref()) != Some(policy))
    {
        set_classic_tls_policy(ctx, name, port, policy).await?;
    }
    if !health_check_matches(live, wanted) {
        client
            .configure_health_check()
            .load_balancer_name(name)
            .health_check(
                elb::types::HealthCheck::builder()
                    .target(&wanted.health_check)
                    .interval(HEALTH_INTERVAL)
                    .timeout(HEALTH_TIMEOUT)
                    .healthy_threshold(HEALTHY_THRESHOLD)
                    .unhealthy_threshold(UNHEALTHY_THRESHOLD)
                    .build()
                    .expect("every required field is set"),
            )
            .send()
            .await
            .op("ConfigureHealthCheck", name)?;
    }
    let attributes_ok = live.is_some_and(|l| {
        l.cross_zone == Some(wanted.cross_zone) && l.draining_seconds == Some(wanted.draining)
    });
    if !attributes_ok {
        let draining = elb::types::ConnectionDraining::builder()
            .enabled(wanted.draining > 0)
            .set_timeout((wanted.draining > 0).then_some(wanted.draining as i32))
            .build();
        client
            .modify_load_balancer_attributes()
            .load_balancer_name(name)
            .load_balancer_attributes(
                elb::types::LoadBalancerAttributes::builder()
                    .cross_zone_load_balancing(
                        elb::types::CrossZoneLoadBalancing::builder()
                            .enabled(wanted.cross_zone)
                            .build(),
                    )
                    .connection_draining(draining)
                    .build(),
            )
            .send()
            .await
            .op("ModifyLoadBalancerAttributes", name)?;
    }
    Ok(())
}

/// Gives the classic load balancer's HTTPS listener on `port` a listener policy referencing
/// predefined TLS policy `predefined` (made first if missing; the one it replaces stays
/// defined on the load balancer, unused).
async fn set_classic_tls_policy(
    ctx: &Ctx<'_>,
    name: &str,
    port: i32,
    predefined: &str,
) -> Result<(), AwsError> {
    let client = &ctx.clients.elb;
    let policy = classic_policy_name(predefined);
    let created = client
        .create_load_balancer_policy()
        .load_balancer_name(name)
        .policy_name(&policy)
        .policy_type_name(TLS_POLICY_TYPE)
        .policy_attributes(
            elb::types::PolicyAttribute::builder()
                .attribute_name(REFERENCE_POLICY)
                .attribute_value(predefined)
                .build(),
        )
        .send()
        .await
        .op("CreateLoadBalancerPolicy", name);
    match created {
        Err(error) if error.code() == Some("DuplicatePolicyName") => {}
        other => {
            other?;
        }
    }
    client
        .set_load_balancer_policies_of_listener()
        .load_balancer_name(name)
        .load_balancer_port(port)
        .policy_names(&policy)
        .send()
        .await
        .op("SetLoadBalancerPoliciesOfListener", name)?;
    Ok(())
}

fn target_group_name(lb: &str, port: i32) -> String {
    format!("{lb}-{port}")
}

async fn ensure_application(
    ctx: &Ctx<'_>,
    resource: &Resource,
    wanted: &Wanted,
    live: Option<&LiveLoadBalancer>,
) -> Result<(), AwsError> {
    use elbv2::types::{
        Action, ActionTypeEnum, Certificate, LoadBalancerTypeEnum, ProtocolEnum, Tag,
        TargetGroupAttribute, TargetTypeEnum,
    };
    let name = resource.id.name.as_str();
    let client = &ctx.clients.elbv2;
    let tags: Vec<Tag> = ctx
        .tags(resource)
        .into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
    if name.len() > 32 - 4 {
        return Err(AwsError::precondition(
            "CreateLoadBalancer (application)",
            name,
            "names of application load balancers and their target groups are limited to 32 characters",
            "use a shorter project or environment name",
        ));
    }

    let mut target_groups = live.map(|l| l.target_groups.clone()).unwrap_or_default();
    for (_, to, protocol) in &wanted.listeners {
        let group_name = target_group_name(name, *to);
        let arn = match target_groups.get(to) {
            Some(arn) => arn.clone(),
            None => {
                let created = client
                    .create_target_group()
                    .name(&group_name)
                    .protocol(ProtocolEnum::from(protocol.as_str()))
                    .port(*to)
                    .vpc_id(&ctx.network.vpc_id)
                    .target_type(TargetTypeEnum::Instance)
                    .set_tags(Some(tags.clone()))
                    .send()
                    .await
                    .op("CreateTargetGroup", &group_name)?;
                let arn = created
                    .target_groups()
                    .first()
                    .and_then(|g| g.target_group_arn())
                    .unwrap_or_default()
                    .to_owned();
                target_groups.insert(*to, arn.clone());
                arn
            }
        };
        if !health_check_matches(live, wanted) {
            let (protocol, port) = wanted
                .health_check
                .split_once('/')
                .map_or(("HTTPS", "443"), |(head, _)| {
                    head.split_once(':').unwrap_or(("HTTPS", "443"))
                });
            client
                .modify_target_group()
                .target_group_arn(&arn)
                .health_check_protocol(ProtocolEnum::from(protocol))
                .health_check_port(port)
                .health_check_path(&wanted.health_path)
                .health_check_interval_seconds(HEALTH_INTERVAL)
                .health_check_timeout_seconds(HEALTH_TIMEOUT)
                .healthy_threshold_count(HEALTHY_THRESHOLD)
                .unhealthy_threshold_count(UNHEALTHY_THRESHOLD)
                .send()
                .await
                .op("ModifyTargetGroup", &group_name)?;
        }
        if live.and_then(|l| l.draining_seconds) != Some(wanted.draining) {
            client
                .modify_target_group_attributes()
                .target_group_arn(&arn)
                .attributes(
                    TargetGroupAttribute::builder()
                        .key("deregistration_delay.timeout_seconds")
                        .value(wanted.draining.to_string())
                        .build(),
                )
                .send()
                .await
                .op("ModifyTargetGroupAttributes", &group_name)?;
        }
    }

    let (arn, listener_arns) = match live.and_then(|l| l.arn.clone()) {
        Some(arn) => {
            let mut have = live
                .map(|l| l.security_group_ids.clone())
                .unwrap_or_default();
            have.sort();
            let mut want = wanted.security_groups.clone();
            want.sort();
            if have != want {
                client
                    .set_security_groups()
                    .load_balancer_arn(&arn)
                    .set_security_groups(Some(want))
                    .send()
                    .await
                    .op("SetSecurityGroups", name)?;
            }
            (
                arn,
                live.map(|l| l.listener_arns.clone()).unwrap_or_default(),
            )
        }
        None => {
            let created = client
                .create_load_balancer()
                .name(name)
                .r#type(LoadBalancerTypeEnum::Application)
                .set_subnets(Some(
                    ctx.network.subnets.iter().map(|s| s.id.clone()).collect(),
                ))
                .set_security_groups(Some(wanted.security_groups.clone()))
                .set_tags(Some(tags.clone()))
                .send()
                .await
                .op("CreateLoadBalancer (application)", name)?;
            let arn = created
                .load_balancers()
                .first()
                .and_then(|l| l.load_balancer_arn())
                .unwrap_or_default()
                .to_owned();
            (arn, BTreeMap::new())
        }
    };
    for (from, to, protocol) in &wanted.listeners {
        let forward = Action::builder()
            .r#type(ActionTypeEnum::Forward)
            .target_group_arn(&target_groups[to])
            .build();
        let certificates = (protocol == "HTTPS").then(|| {
            vec![
                Certificate::builder()
                    .set_certificate_arn(wanted.certificate.clone())
                    .build(),
            ]
        });
        let tls_policy = if protocol == "HTTPS" {
            wanted.tls_policy.clone()
        } else {
            None
        };
        match listener_arns.get(from) {
            None => {
                client
                    .create_listener()
                    .load_balancer_arn(&arn)
                    .port(*from)
                    .protocol(ProtocolEnum::from(protocol.as_str()))
                    .set_certificates(certificates)
                    .set_ssl_policy(tls_policy)
                    .default_actions(forward)
                    .send()
                    .await
                    .op("CreateListener", format!("{name}:{from}"))?;
            }
            Some(listener) => {
                let same = live.is_some_and(|l| {
                    l.listeners.contains(&format!("{from}->{to} {protocol}"))
                        && (protocol != "HTTPS"
                            || (l.certificate == wanted.certificate
                                && l.tls_policy == wanted.tls_policy))
                });
                if !same {
                    client
                        .modify_listener()
                        .listener_arn(listener)
                        .port(*from)
                        .protocol(ProtocolEnum::from(protocol.as_str()))
                        .set_certificates(certificates)
                        .set_ssl_policy(tls_policy)
                        .default_actions(forward)
                        .send()
                        .await
                        .op("ModifyListener", format!("{name}:{from}"))?;
                }
            }
        }
    }
    Ok(())
}

/// Deletes a load balancer rigger observed (and, for an application one, its target groups).
pub(crate) async fn delete(
    ctx: &Ctx<'_>,
    live: &LiveLoadBalancer,
    name: &str,
) -> Result<(), AwsError> {
    match live.kind {
        Some(LoadBalancerKind::Application) => {
            if let Some(arn) = &live.arn {
                ctx.clients
                    .elbv2
                    .delete_load_balancer()
                    .load_balancer_arn(arn)
                    .send()
                    .await
                    .op("DeleteLoadBalancer (application)", name)?;
            }
            for arn in live.target_groups.values() {
                retry_in_use(ctx, "DeleteTargetGroup", arn, || async {
                    ctx.clients
                        .elbv2
                        .delete_target_group()
                        .target_group_arn(arn)
                        .send()
                        .await
                        .op("DeleteTargetGroup", arn)
                        .map(|_| ())
                })
                .await?;
            }
        }
        _ => {
            ctx.clients
                .elb
                .delete_load_balancer()
                .load_balancer_name(name)
                .send()
                .await
                .op("DeleteLoadBalancer (classic)", name)?;
        }
    }
    Ok(())
}

/// Each registered instance's health as the load balancer reports it (`InService`,
/// `OutOfService`, `healthy`, ...).
pub async fn instance_health(
    clients: &Clients,
    lb: &LiveLoadBalancer,
    name: &str,
) -> Result<BTreeMap<String, String>, AwsError> {
    Ok(instance_health_reasons(clients, lb, name)
        .await?
        .into_iter()
        .map(|(id, (state, _))| (id, state))
        .collect())
}

/// Each registered instance's health and the load balancer's reason for it (empty when it
/// gives none): what a rolled-back deploy reports.
pub async fn instance_health_reasons(
    clients: &Clients,
    lb: &LiveLoadBalancer,
    name: &str,
) -> Result<BTreeMap<String, (String, String)>, AwsError> {
    let mut health = BTreeMap::new();
    match lb.kind {
        Some(LoadBalancerKind::Application) => {
            if let Some(arn) = lb.target_groups.get(&443) {
                let answer = clients
                    .elbv2
                    .describe_target_health()
                    .target_group_arn(arn)
                    .send()
                    .await
                    .op("DescribeTargetHealth", arn)?;
                for description in answer.target_health_descriptions() {
                    let health_of = description.target_health();
                    if let (Some(target), Some(state)) = (
                        description.target().and_then(|t| t.id()),
                        health_of.and_then(|h| h.state()),
                    ) {
                        let reason = [
                            health_of
                                .and_then(|h| h.reason())
                                .map(|r| r.as_str().to_owned()),
                            health_of.and_then(|h| h.description()).map(str::to_owned),
                        ]
                        .into_iter()
                        .flatten()
                        .collect::<Vec<_>>()
                        .join(": ");
                        health.insert(target.to_owned(), (state.as_str().to_owned(), reason));
                    }
                }
            }
        }
        _ => {
            let answer = clients
                .elb
                .describe_instance_health()
                .load_balancer_name(name)
                .send()
                .await
                .op("DescribeInstanceHealth", name)?;
            for state in answer.instance_states() {
                if let (Some(id), Some(s)) = (state.instance_id(), state.state()) {
                    let reason = [state.reason_code(), state.description()]
                        .into_iter()
                        .flatten()
                        .filter(|r| !r.is_empty() && *r != "N/A")
                        .collect::<Vec<_>>()
                        .join(": ");
                    health.insert(id.to_owned(), (s.to_owned(), reason));
                }
            }
        }
    }
    Ok(health)
}

/// Takes instances out of the load balancer (connection draining lets their requests finish).
pub async fn deregister(
    clients: &Clients,
    lb: &LiveLoadBalancer,
    name: &str,
    instances: &[String],
) -> Result<(), AwsError> {
    if instances.is_empty() {
        return Ok(());
    }
    match lb.kind {
        Some(LoadBalancerKind::Application) => {
            for arn in lb.target_groups.values() {
                let targets = instances
                    .iter()
                    .map(|id| {
                        aws_sdk_elasticloadbalancingv2::types::TargetDescription::builder()
                            .id(id)
                            .build()
                    })
                    .collect::<Vec<_>>();
                clients
                    .elbv2
                    .deregister_targets()
                    .target_group_arn(arn)
                    .set_targets(Some(targets))
                    .send()
                    .await
                    .op("DeregisterTargets", arn)?;
            }
        }
        _ => {
            let list = instances
                .iter()
                .map(|id| {
                    aws_sdk_elasticloadbalancing::types::Instance::builder()
                        .instance_id(id)
                        .build()
                })
                .collect::<Vec<_>>();
            clients
                .elb
                .deregister_instances_from_load_balancer()
                .load_balancer_name(name)
                .set_instances(Some(list))
                .send()
                .await
                .op("DeregisterInstancesFromLoadBalancer", name)?;
        }
    }
    Ok(())
}
