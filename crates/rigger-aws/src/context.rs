//! What every step of an apply runs with (below the resource modules, which take it, and
//! `apply`, which makes it): the environment, its clients, what was observed, the topology,
//! how long to wait, and the ids of what exists by now.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_ec2::types as ec2;
use rigger_topology::{Resource, ResourceId, Topology};

use crate::Clients;
use crate::environment::{AwsEnvironment, Network, StandAlone};
use crate::error::{AwsError, ErrorKind};
use crate::live::Live;
use rigger_engine::progress::Progress;

/// How long to wait for AWS to finish something, and how often to look.
#[derive(Debug, Clone, Copy)]
pub struct Waits {
    pub poll: Duration,
    pub timeout: Duration,
}

impl Default for Waits {
    fn default() -> Waits {
        Waits {
            poll: Duration::from_secs(3),
            timeout: Duration::from_secs(900),
        }
    }
}

/// Everything a step needs.
pub(crate) struct Ctx<'a> {
    pub env: &'a AwsEnvironment,
    pub clients: &'a Clients,
    pub network: &'a Network,
    pub live: &'a Live,
    pub topology: &'a Topology,
    pub waits: Waits,
    pub report: &'a dyn Progress,
    /// Ids of what exists by now: observed, then created by earlier steps.
    pub(crate) security_groups: Mutex<BTreeMap<String, String>>,
    pub(crate) volumes: Mutex<BTreeMap<String, String>>,
    /// Launch configurations' names on AWS by the topology's names.
    pub(crate) launch_configurations: Mutex<BTreeMap<String, String>>,
}

impl Ctx<'_> {
    /// The id of security group `name`, which an earlier wave created if it was missing.
    pub fn sg_id(&self, name: &str) -> Result<String, AwsError> {
        self.security_groups
            .lock()
            .expect("not poisoned")
            .get(name)
            .cloned()
            .ok_or_else(|| {
                AwsError::precondition(
                    "(lookup)",
                    format!("security group {name}"),
                    "it does not exist",
                    "run `rigger up` again: the group is created by an earlier step",
                )
            })
    }

    /// The topology's tags of `resource`, plus `Name`.
    pub fn tags(&self, resource: &Resource) -> Vec<(String, String)> {
        let mut tags: Vec<(String, String)> = resource
            .tags
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        tags.push(("Name".into(), resource.id.name.clone()));
        tags
    }

    pub(crate) fn ec2_tags(
        &self,
        resource: &Resource,
        kind: ec2::ResourceType,
    ) -> ec2::TagSpecification {
        let mut spec = ec2::TagSpecification::builder().resource_type(kind);
        for (key, value) in self.tags(resource) {
            spec = spec.tags(ec2::Tag::builder().key(key).value(value).build());
        }
        spec.build()
    }

    pub(crate) fn say(&self, line: &str) {
        self.report.report(line);
    }

    /// Polls `check` until it returns true or the timeout passes.
    pub async fn wait_for<F, Fut>(&self, what: &str, mut check: F) -> Result<(), AwsError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<bool, AwsError>>,
    {
        let started = std::time::Instant::now();
        loop {
            if check().await? {
                return Ok(());
            }
            if started.elapsed() > self.waits.timeout {
                return Err(AwsError::Timeout {
                    what: what.to_owned(),
                    seconds: self.waits.timeout.as_secs(),
                });
            }
            tokio::time::sleep(self.waits.poll).await;
        }
    }

    pub(crate) fn desired(&self, id: &ResourceId) -> Option<&Resource> {
        self.topology.resources.iter().find(|r| &r.id == id)
    }

    pub(crate) fn stand_alone(&self, name: &str) -> Option<StandAlone> {
        self.env
            .stand_alone_servers(self.network)
            .into_iter()
            .find(|s| s.name == name)
    }
}

/// Retries `call` while the service says the resource is still in use.
pub(crate) async fn retry_in_use<F, Fut>(
    ctx: &Ctx<'_>,
    operation: &str,
    resource: &str,
    mut call: F,
) -> Result<(), AwsError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), AwsError>>,
{
    let started = std::time::Instant::now();
    loop {
        match call().await {
            Err(error)
                if error.kind() == ErrorKind::DependencyViolation
                    && started.elapsed() < ctx.waits.timeout =>
            {
                tracing::info!(operation, resource, "still in use; retrying");
                tokio::time::sleep(ctx.waits.poll).await;
            }
            other => return other,
        }
    }
}

/// The context steps run in: the ids of what exists, as observed.
pub(crate) fn context<'a>(
    env: &'a AwsEnvironment,
    clients: &'a Clients,
    network: &'a Network,
    live: &'a Live,
    topology: &'a Topology,
    waits: Waits,
    report: &'a dyn Progress,
) -> Ctx<'a> {
    Ctx {
        env,
        clients,
        network,
        live,
        topology,
        waits,
        report,
        security_groups: Mutex::new(
            live.security_groups
                .iter()
                .map(|(name, group)| (name.clone(), group.id.clone()))
                .collect(),
        ),
        volumes: Mutex::new(
            live.volumes_by_name()
                .into_iter()
                .filter_map(|(name, list)| Some((name, list.first()?.id.clone())))
                .collect(),
        ),
        launch_configurations: Mutex::new(
            live.launch_configurations_by_name()
                .into_iter()
                .map(|(name, lc)| (name, lc.aws_name.clone()))
                .collect(),
        ),
    }
}
