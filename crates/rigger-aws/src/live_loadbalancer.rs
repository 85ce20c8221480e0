//! The load balancer, classic or application, as AWS shows it ([`read_classic`],
//! [`read_application`]): what `live` observes and `loadbalancer` converges.

use std::collections::BTreeMap;

use aws_sdk_elasticloadbalancing as elb;
use aws_sdk_elasticloadbalancingv2 as elbv2;
use rigger_config::LoadBalancerKind;

use crate::Clients;
use crate::error::{AwsError, Context as _, ErrorKind};
use crate::tags::Tags;

#[derive(Debug, Clone, Default)]
pub struct LiveLoadBalancer {
    pub kind: Option<LoadBalancerKind>,
    pub dns_name: String,
    /// Application load balancers only.
    pub arn: Option<String>,
    /// `80->80 HTTP`, by load balancer port.
    pub listeners: Vec<String>,
    /// Application load balancers: listener port -> listener ARN.
    pub listener_arns: BTreeMap<i32, String>,
    /// Application load balancers: target group port -> ARN.
    pub target_groups: BTreeMap<i32, String>,
    pub health_check: Option<String>,
    /// Its interval, timeout and thresholds (`rigger_topology::health_check::timing`).
    pub health_check_timing: Option<String>,
    pub security_group_ids: Vec<String>,
    pub certificate: Option<String>,
    /// The HTTPS listener's TLS (security) policy: an application load balancer's `SslPolicy`,
    /// the predefined policy a classic one's listener policy references.
    pub tls_policy: Option<String>,
    pub cross_zone: Option<bool>,
    pub draining_seconds: Option<i64>,
    pub tags: Tags,
}

/// The attribute of a classic listener policy that names the predefined policy it copies.
pub(crate) const REFERENCE_POLICY: &str = "Reference-Security-Policy";

/// The type of a classic load balancer's listener policies that hold TLS settings.
pub(crate) const TLS_POLICY_TYPE: &str = "SSLNegotiationPolicyType";

/// The name rigger gives a classic load balancer's listener policy referencing `predefined`.
pub(crate) fn classic_policy_name(predefined: &str) -> String {
    format!("rigger-{predefined}")
}

/// The predefined TLS policy a classic load balancer's HTTPS listener uses: the one its
/// listener policy references (or names, when the listener uses a predefined policy as is).
async fn read_classic_tls_policy(
    clients: &Clients,
    name: &str,
    policy_names: &[String],
) -> Result<Option<String>, AwsError> {
    if let Some(predefined) = policy_names
        .iter()
        .find(|p| p.starts_with("ELBSecurityPolicy-"))
    {
        return Ok(Some(predefined.clone()));
    }
    if policy_names.is_empty() {
        return Ok(None);
    }
    let described = clients
        .elb
        .describe_load_balancer_policies()
        .load_balancer_name(name)
        .set_policy_names(Some(policy_names.to_vec()))
        .send()
        .await
        .op("DescribeLoadBalancerPolicies", name);
    let described = match described {
        Ok(described) => described,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    Ok(described
        .policy_descriptions()
        .iter()
        .filter(|p| p.policy_type_name() == Some(TLS_POLICY_TYPE))
        .flat_map(|p| p.policy_attribute_descriptions())
        .find(|a| a.attribute_name() == Some(REFERENCE_POLICY))
        .and_then(|a| a.attribute_value())
        .map(str::to_owned))
}

/// The classic load balancer named `name`, if it exists.
pub async fn read_classic(
    clients: &Clients,
    name: &str,
) -> Result<Option<LiveLoadBalancer>, AwsError> {
    let found = clients
        .elb
        .describe_load_balancers()
        .load_balancer_names(name)
        .send()
        .await
        .op("DescribeLoadBalancers (classic)", name);
    let found = match found {
        Ok(found) => found,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let Some(description) = found.load_balancer_descriptions().first() else {
        return Ok(None);
    };
    let mut listeners: Vec<&elb::types::Listener> = description
        .listener_descriptions()
        .iter()
        .filter_map(|l| l.listener())
        .collect();
    listeners.sort_by_key(|l| l.load_balancer_port());
    let https_policies: Vec<String> = description
        .listener_descriptions()
        .iter()
        .find(|l| {
            l.listener()
                .is_some_and(|l| l.protocol().eq_ignore_ascii_case("HTTPS"))
        })
        .map(|l| l.policy_names().to_vec())
        .unwrap_or_default();
    let tls_policy = read_classic_tls_policy(clients, name, &https_policies).await?;
    let tags = clients
        .elb
        .describe_tags()
        .load_balancer_names(name)
        .send()
        .await
        .op("DescribeTags (classic load balancer)", name)?;
    let tags: Tags = tags
        .tag_descriptions()
        .iter()
        .flat_map(|d| d.tags())
        .map(|t| (t.key().to_owned(), t.value().unwrap_or_default().to_owned()))
        .collect();
    let attributes = clients
        .elb
        .describe_load_balancer_attributes()
        .load_balancer_name(name)
        .send()
        .await
        .op("DescribeLoadBalancerAttributes", name)?;
    let attributes = attributes.load_balancer_attributes();
    let draining = attributes.and_then(|a| a.connection_draining());
    Ok(Some(LiveLoadBalancer {
        kind: Some(LoadBalancerKind::Classic),
        dns_name: description.dns_name().unwrap_or_default().to_owned(),
        arn: None,
        listeners: listeners
            .iter()
            .map(|l| {
                format!(
                    "{}->{} {}",
                    l.load_balancer_port(),
                    l.instance_port(),
                    l.protocol().to_ascii_uppercase()
                )
            })
            .collect(),
        listener_arns: BTreeMap::new(),
        target_groups: BTreeMap::new(),
        health_check: description
            .health_check()
            .map(|h| h.target().to_owned())
            .filter(|t| !t.is_empty()),
        health_check_timing: description.health_check().map(|h| {
            rigger_topology::health_check::timing(
                h.interval(),
                h.timeout(),
                h.healthy_threshold(),
                h.unhealthy_threshold(),
            )
        }),
        security_group_ids: description.security_groups().to_vec(),
        certificate: listeners
            .iter()
            .find(|l| l.load_balancer_port() == 443)
            .and_then(|l| l.ssl_certificate_id())
            .map(str::to_owned),
        tls_policy,
        cross_zone: attributes
            .and_then(|a| a.cross_zone_load_balancing())
            .map(|c| c.enabled()),
        draining_seconds: Some(match draining {
            Some(d) if d.enabled() => i64::from(d.timeout().unwrap_or(300)),
            _ => 0,
        }),
        tags,
    }))
}

/// The application load balancer named `name`, with its listeners and target groups.
pub async fn read_application(
    clients: &Clients,
    name: &str,
) -> Result<Option<LiveLoadBalancer>, AwsError> {
    let found = clients
        .elbv2
        .describe_load_balancers()
        .names(name)
        .send()
        .await
        .op("DescribeLoadBalancers (application)", name);
    let found = match found {
        Ok(found) => found,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let Some(lb) = found.load_balancers().first() else {
        return Ok(None);
    };
    let arn = lb.load_balancer_arn().unwrap_or_default().to_owned();
    let tags = clients
        .elbv2
        .describe_tags()
        .resource_arns(&arn)
        .send()
        .await
        .op("DescribeTags (application load balancer)", name)?;
    let tags: Tags = tags
        .tag_descriptions()
        .iter()
        .flat_map(|d| d.tags())
        .filter_map(|t| {
            Some((
                t.key()?.to_owned(),
                t.value().unwrap_or_default().to_owned(),
            ))
        })
        .collect();
    let groups = clients
        .elbv2
        .describe_target_groups()
        .load_balancer_arn(&arn)
        .send()
        .await
        .op("DescribeTargetGroups", name)?;
    let mut target_groups = BTreeMap::new();
    let mut health_check = None;
    let mut health_check_timing = None;
    let mut draining_seconds = None;
    let mut port_of_group = BTreeMap::new();
    for group in groups.target_groups() {
        let port = group.port().unwrap_or_default();
        let group_arn = group.target_group_arn().unwrap_or_default().to_owned();
        port_of_group.insert(group_arn.clone(), port);
        if port == 443 {
            let check_port = match group.health_check_port() {
                Some("traffic-port") | None => port.to_string(),
                Some(p) => p.to_owned(),
            };
            health_check = Some(format!(
                "{}:{check_port}{}",
                group
                    .health_check_protocol()
                    .map_or("HTTP".to_owned(), |p| p.as_str().to_owned()),
                group.health_check_path().unwrap_or("/")
            ));
            health_check_timing = Some(rigger_topology::health_check::timing(
                group.health_check_interval_seconds().unwrap_or_default(),
                group.health_check_timeout_seconds().unwrap_or_default(),
                group.healthy_threshold_count().unwrap_or_default(),
                group.unhealthy_threshold_count().unwrap_or_default(),
            ));
            let attributes = clients
                .elbv2
                .describe_target_group_attributes()
                .target_group_arn(&group_arn)
                .send()
                .await
                .op("DescribeTargetGroupAttributes", &group_arn)?;
            draining_seconds = attributes
                .attributes()
                .iter()
                .find(|a| a.key() == Some("deregistration_delay.timeout_seconds"))
                .and_then(|a| a.value())
                .and_then(|v| v.parse().ok());
        }
        target_groups.insert(port, group_arn);
    }
    let listeners = clients
        .elbv2
        .describe_listeners()
        .load_balancer_arn(&arn)
        .send()
        .await
        .op("DescribeListeners", name)?;
    let mut listeners: Vec<&elbv2::types::Listener> = listeners.listeners().iter().collect();
    listeners.sort_by_key(|l| l.port());
    let describe = |l: &elbv2::types::Listener| {
        let to = l
            .default_actions()
            .iter()
            .find_map(|a| a.target_group_arn())
            .and_then(|t| port_of_group.get(t))
            .map_or("?".to_owned(), |p| p.to_string());
        format!(
            "{}->{to} {}",
            l.port().unwrap_or_default(),
            l.protocol().map_or("?", |p| p.as_str())
        )
    };
    Ok(Some(LiveLoadBalancer {
        kind: Some(LoadBalancerKind::Application),
        dns_name: lb.dns_name().unwrap_or_default().to_owned(),
        arn: Some(arn.clone()),
        listeners: listeners.iter().map(|l| describe(l)).collect(),
        listener_arns: listeners
            .iter()
            .filter_map(|l| Some((l.port()?, l.listener_arn()?.to_owned())))
            .collect(),
        target_groups,
        health_check,
        health_check_timing,
        security_group_ids: lb.security_groups().to_vec(),
        certificate: listeners
            .iter()
            .find(|l| l.port() == Some(443))
            .and_then(|l| l.certificates().first())
            .and_then(|c| c.certificate_arn())
            .map(str::to_owned),
        tls_policy: listeners
            .iter()
            .find(|l| l.protocol() == Some(&elbv2::types::ProtocolEnum::Https))
            .and_then(|l| l.ssl_policy())
            .map(str::to_owned),
        // Cross-zone balancing is always on for application load balancers.
        cross_zone: Some(true),
        draining_seconds,
        tags,
    }))
}
