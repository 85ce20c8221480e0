//! What exists of a local environment, in the planner's terms: the supervisor's status and
//! registry, mapped onto the topology's resource ids. Nothing runs -> an empty world.

use std::collections::BTreeMap;

use rigger_plan::{Observed, ObservedResource};
use rigger_topology::{ResourceKind, Topology};

use crate::environment::LocalEnvironment;

/// The observed world of `env` given its desired `topology`.
///
/// While a supervisor runs, the resources it realises implicitly (security groups as bind
/// addresses and pg_hba rules, launch templates as rendered recipes, the groups themselves)
/// exist exactly as applied. Servers exist only while every one of their processes runs, and a
/// group's servers fill its slots in order, so a dead or missing server shows as a creation.
pub fn observe(env: &LocalEnvironment, topology: &Topology) -> Observed {
    let mut observed = Observed::empty();
    let Some(status) = crate::control_status_snapshot(env) else {
        return observed;
    };
    let healthy = |id: &str| {
        status.servers.iter().any(|s| {
            s.id == id
                && !s.processes.is_empty()
                && s.processes.iter().all(|p| p.state == "running")
        })
    };
    let servers_with_role = |role: &str| {
        status
            .servers
            .iter()
            .filter(|s| {
                s.roles.iter().any(|r| r == role)
                    && !s.processes.is_empty()
                    && s.processes.iter().all(|p| p.state == "running")
            })
            .count()
    };
    let in_service = |group: &str| {
        status
            .servers
            .iter()
            .filter(|s| {
                s.roles.iter().any(|r| r == group)
                    && s.state == "in_service"
                    && s.processes.iter().all(|p| p.state == "running")
            })
            .count()
    };
    let prefix = format!("{}-{}-", topology.project, topology.environment);
    let group_counts: BTreeMap<&str, usize> =
        [("web", in_service("web")), ("worker", in_service("worker"))].into();
    for resource in &topology.resources {
        let short = resource
            .id
            .name
            .strip_prefix(&prefix)
            .unwrap_or(&resource.id.name);
        let exists = match resource.id.kind {
            ResourceKind::GroupServer => {
                // `web[3]` exists when at least 3 web servers are in service.
                let (group, slot) = short.split_once('[').unwrap_or((short, "0]"));
                let slot: usize = slot.trim_end_matches(']').parse().unwrap_or(usize::MAX);
                group_counts.get(group).is_some_and(|count| slot <= *count)
            }
            // Stand-alone servers are matched by role, not by id: after a failover the
            // primary is the former `db-replica1`, and a rebuilt replica has a new number.
            ResourceKind::Server => match short {
                "db-primary" => servers_with_role("db-primary") >= 1,
                replica if replica.starts_with("db-replica") => {
                    let n: usize = replica
                        .trim_start_matches("db-replica")
                        .parse()
                        .unwrap_or(usize::MAX);
                    servers_with_role("db-replica") >= n
                }
                other => healthy(other),
            },
            ResourceKind::LoadBalancer => healthy("lb"),
            _ => true,
        };
        if exists {
            observed.resources.insert(
                resource.id.clone(),
                ObservedResource {
                    attributes: resource
                        .attributes
                        .iter()
                        .map(|(k, a)| (k.clone(), a.value.clone()))
                        .collect(),
                    tags: resource.tags.clone(),
                    depends_on: resource.depends_on.clone(),
                },
            );
        }
    }
    observed
}
