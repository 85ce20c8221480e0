//! What each server publishes about itself, each in a parameter named by its instance id:
//! its SSH host keys, so that rigger pins them instead of trusting the first key a server
//! shows, and how its boot went ([`crate::boot`]).
//!
//! At boot, a server's user-data writes the public keys of `/etc/ssh/ssh_host_*_key.pub` to
//! the plain SSM parameter `/<project>/<env>/hostkeys/<instance id>`, and at its end
//! `/<project>/<env>/boot/<instance id>`, with its own instance profile, which may write
//! those parameters only (`ssm:PutParameter` on `.../hostkeys/${ec2:InstanceID}` and
//! `.../boot/${ec2:InstanceID}`, see the topology's instance profile): no server can publish
//! under another's name. [`published`] reads the keys for the CLI, which pins each server's
//! SSH connection to its own keys under its instance id (`rigger_transport::ssh::PinnedKeys`),
//! so an address a new server reuses is never a conflict. [`prune`] deletes what instances
//! that are gone published (terminated by rigger, by a group's scaling, or by hand): `up` and
//! `status` sweep them, `down` deletes them all.

use std::collections::{BTreeMap, BTreeSet};

use crate::Clients;
use crate::environment::AwsEnvironment;
use crate::error::{AwsError, Context as _};

/// Where the host keys are published, under the environment's parameters.
const HOST_KEYS: &str = "hostkeys/";
/// Where the boot reports are published ([`crate::boot`]).
pub(crate) const BOOT: &str = "boot/";
/// Everything a server publishes about itself.
const PUBLISHED: [&str; 2] = [HOST_KEYS, BOOT];

/// The parameter path the keys are published under: `/<project>/<env>/hostkeys/`.
pub fn path(env: &AwsEnvironment) -> String {
    env.parameter(HOST_KEYS)
}

/// The parameter instance `instance_id` publishes its keys in.
pub fn parameter(env: &AwsEnvironment, instance_id: &str) -> String {
    format!("{}{instance_id}", path(env))
}

/// What every server published under `dir` ([`HOST_KEYS`], [`BOOT`]), by instance id.
pub(crate) async fn published_under(
    env: &AwsEnvironment,
    clients: &Clients,
    dir: &str,
) -> Result<BTreeMap<String, String>, AwsError> {
    let path = env.parameter(dir);
    Ok(crate::parameters::under(clients, &path, false)
        .await?
        .into_iter()
        .filter_map(|(name, value)| Some((name.strip_prefix(&path)?.to_owned(), value)))
        .collect())
}

/// Every server's published keys (the parameter's text: one public key a line), by instance
/// id.
pub async fn published(
    env: &AwsEnvironment,
    clients: &Clients,
) -> Result<BTreeMap<String, String>, AwsError> {
    published_under(env, clients, HOST_KEYS).await
}

/// Every instance that published anything, host keys or a boot report.
pub async fn publishers(
    env: &AwsEnvironment,
    clients: &Clients,
) -> Result<BTreeSet<String>, AwsError> {
    let mut ids = BTreeSet::new();
    for dir in PUBLISHED {
        ids.extend(published_under(env, clients, dir).await?.into_keys());
    }
    Ok(ids)
}

/// Deletes what every instance that no longer exists or is terminating published; returns
/// their instance ids. The instances are asked after the parameters are listed, so a server
/// that publishes meanwhile is never taken for gone.
pub async fn prune(env: &AwsEnvironment, clients: &Clients) -> Result<Vec<String>, AwsError> {
    let published: Vec<String> = publishers(env, clients).await?.into_iter().collect();
    if published.is_empty() {
        return Ok(Vec::new());
    }
    let mut alive = BTreeSet::new();
    // A filter (unlike instance ids) tolerates ids EC2 no longer knows; at most 200 values.
    for ids in published.chunks(200) {
        let pages = clients
            .ec2
            .describe_instances()
            .filters(crate::tags::filter(
                "instance-id",
                ids.iter().map(String::as_str),
            ))
            .into_paginator()
            .send()
            .collect::<Vec<_>>()
            .await;
        for page in pages {
            let page = page.op("DescribeInstances", "instances with published host keys")?;
            for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                let state = instance
                    .state()
                    .and_then(|s| s.name())
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_default();
                if let Some(id) = instance.instance_id()
                    && !is_gone(&state)
                {
                    alive.insert(id.to_owned());
                }
            }
        }
    }
    let gone: Vec<String> = published
        .into_iter()
        .filter(|id| !alive.contains(id))
        .collect();
    forget(env, clients, &gone).await?;
    Ok(gone)
}

/// Whether an instance in EC2 state `state` is gone for good.
fn is_gone(state: &str) -> bool {
    matches!(state, "shutting-down" | "terminated")
}

/// Deletes what `instance_ids` published (some may have published nothing).
pub async fn forget(
    env: &AwsEnvironment,
    clients: &Clients,
    instance_ids: &[String],
) -> Result<(), AwsError> {
    let names: Vec<String> = PUBLISHED
        .iter()
        .flat_map(|dir| {
            instance_ids
                .iter()
                .map(move |id| format!("{}{id}", env.parameter(dir)))
        })
        .collect();
    // DeleteParameters takes at most 10 names; missing ones are reported, not an error.
    for batch in names.chunks(10) {
        clients
            .ssm
            .delete_parameters()
            .set_names(Some(batch.to_vec()))
            .send()
            .await
            .op("DeleteParameters", env.parameter(""))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_terminating_or_terminated_instances_are_gone() {
        for state in ["shutting-down", "terminated"] {
            assert!(is_gone(state), "{state}");
        }
        // A stopped server comes back with the same keys; a pending one is about to publish.
        for state in ["pending", "running", "stopping", "stopped"] {
            assert!(!is_gone(state), "{state}");
        }
    }
}
