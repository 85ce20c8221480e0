//! `rigger status` for an AWS environment, in the `rigger.status` schema the local provider
//! writes (docs/status-json.md): servers by role with their state and load balancer health,
//! groups with min/desired/max, the load balancer's DNS name in `urls`. What only the
//! servers themselves know (processes, replication lag) is left empty.

pub use rigger_plan::status::{
    GroupStatus, Phase, ProcessStatus, ReplicaStatus, ServerStatus, Status,
};

use std::collections::BTreeMap;

use crate::boot::BootReport;
use crate::environment::AwsEnvironment;
use crate::live::{Live, ROLES_TAG};

/// A running server whose boot script has not reported yet ([`crate::boot`]).
pub const BOOTING: &str = "booting";
/// A server whose boot script reported a failure (its report quoted in the message).
pub use rigger_engine::ready::BOOT_FAILED;

/// What a running server's boot report says of its state: `None` when it finished (or
/// reports are not awaited, `boots` is `None`), else [`BOOTING`] or [`BOOT_FAILED`].
fn boot_state(boots: Option<&BTreeMap<String, BootReport>>, id: &str) -> Option<&'static str> {
    match boots?.get(id) {
        Some(BootReport::Finished) => None,
        Some(BootReport::Failed(_)) => Some(BOOT_FAILED),
        None => Some(BOOTING),
    }
}

/// The status of `env` from an observation, the load balancer's instance health and the
/// servers' boot reports (`None` where they are not awaited: an emulator's instances).
pub fn status(
    env: &AwsEnvironment,
    live: &Live,
    health: &BTreeMap<String, String>,
    boots: Option<&BTreeMap<String, BootReport>>,
) -> Status {
    let prefix = format!("{}-{}-", env.project(), env.name);
    let short = |name: &str| name.strip_prefix(&prefix).unwrap_or(name).to_owned();
    let mut servers = Vec::new();
    let mut groups = Vec::new();
    // The servers' own words on a failed boot, for `up` and `status` to show.
    let mut failed_boots: Vec<String> = Vec::new();
    let mut note_failed_boot = |server: &str, instance_id: &str| {
        if let Some(BootReport::Failed(why)) = boots.and_then(|b| b.get(instance_id)) {
            failed_boots.push(format!("{server}'s boot failed: {why}"));
        }
    };
    for (name, group) in &live.groups {
        let role = short(name);
        groups.push(GroupStatus {
            name: role.clone(),
            min: group.min.max(0) as u32,
            desired: group.desired.max(0) as u32,
            max: group.max.max(0) as u32,
        });
        for (slot, member) in group.instances.iter().enumerate() {
            let instance = live.instances.get(&member.id);
            let lb = (role == "web").then(|| {
                health
                    .get(&member.id)
                    .cloned()
                    .unwrap_or_else(|| "unknown".into())
            });
            let in_service = match &lb {
                Some(h) => h == "InService" || h == "healthy",
                None => member.lifecycle == "InService",
            };
            let boot = boot_state(boots, &member.id);
            let state = match instance.map(|i| i.state.as_str()) {
                Some("running") if let Some(boot) = boot => boot.to_owned(),
                Some("running") if in_service => "in_service".to_owned(),
                Some("running") if member.health == "Unhealthy" => "unhealthy".to_owned(),
                Some("running") | Some("pending") => "pending".to_owned(),
                Some(other) => other.to_owned(),
                None => "unknown".to_owned(),
            };
            let id = format!("{role}-{}", slot + 1);
            if state == BOOT_FAILED {
                note_failed_boot(&id, &member.id);
            }
            servers.push(ServerStatus {
                // As `rigger exec` and `ssh` name it (`servers::servers`).
                id,
                roles: vec![role.clone()],
                address: instance
                    .and_then(|i| i.private_address.clone())
                    .unwrap_or_default(),
                release: instance
                    .and_then(|i| i.tags.get("release").cloned())
                    .unwrap_or_default(),
                state,
                processes: Vec::new(),
                load_balancer: lb,
            });
        }
    }
    for (name, instances) in live.stand_alone_instances() {
        let Some(instance) = instances.first() else {
            continue;
        };
        let state = match instance.state.as_str() {
            "running" => boot_state(boots, &instance.id)
                .unwrap_or("in_service")
                .to_owned(),
            other => other.to_owned(),
        };
        if state == BOOT_FAILED {
            note_failed_boot(&short(&name), &instance.id);
        }
        servers.push(ServerStatus {
            id: short(&name),
            roles: instance
                .tags
                .get(ROLES_TAG)
                .map(|r| r.split(',').map(str::to_owned).collect())
                .unwrap_or_default(),
            address: instance.private_address.clone().unwrap_or_default(),
            release: instance.tags.get("release").cloned().unwrap_or_default(),
            state,
            processes: Vec::new(),
            load_balancer: None,
        });
    }
    let lb = live.load_balancer(env.aws().load_balancer);
    let urls = lb
        .map(|lb| {
            vec![
                format!("https://{}/", lb.dns_name),
                format!("http://{}/", lb.dns_name),
            ]
        })
        .unwrap_or_default();
    let nothing = servers.is_empty() && groups.is_empty() && lb.is_none();
    let ready = !nothing && lb.is_some() && servers.iter().all(|s| s.state == "in_service");
    let (phase, message) = if nothing {
        (Phase::Down, "nothing exists (run `rigger up`)".to_owned())
    } else if ready {
        (
            Phase::Ready,
            format!("{} servers in service", servers.len()),
        )
    } else if !failed_boots.is_empty() {
        (Phase::Starting, failed_boots.join("; "))
    } else {
        let waiting = servers.iter().filter(|s| s.state != "in_service").count();
        (
            Phase::Starting,
            format!("{waiting} of {} servers not in service yet", servers.len()),
        )
    };
    let release = live
        .groups
        .values()
        .find_map(|g| g.tags.get("release").cloned())
        .unwrap_or_default();
    Status {
        schema: "rigger.status".into(),
        version: 1,
        project: env.project().to_owned(),
        environment: env.name.clone(),
        provider: "aws".into(),
        phase,
        message,
        release,
        urls,
        supervisor_pid: None,
        supervisor_restarts: None,
        maintenance: false,
        groups,
        servers,
        replication: Vec::new(),
        updated: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::LiveGroup;
    use crate::servers::tests::{env, instance, member};

    /// A web group of two and a stand-alone cache server, every instance running and the
    /// load balancer saying both web servers are in service.
    fn live() -> (Live, BTreeMap<String, String>) {
        let group = [("aws:autoscaling:groupName", "shop-prod-web")];
        let mut live = Live::default();
        for i in [
            instance("i-web1", "running", None, &group),
            instance("i-web2", "running", None, &group),
            instance(
                "i-cache",
                "running",
                None,
                &[("Name", "shop-prod-cache"), ("roles", "cache,queue")],
            ),
        ] {
            live.instances.insert(i.id.clone(), i);
        }
        live.groups.insert(
            "shop-prod-web".into(),
            LiveGroup {
                instances: vec![
                    member("i-web1", "InService", "Healthy"),
                    member("i-web2", "InService", "Healthy"),
                ],
                attached: ["i-web1", "i-web2"].map(String::from).into(),
                ..LiveGroup::default()
            },
        );
        let health = [("i-web1", "InService"), ("i-web2", "InService")]
            .map(|(id, state)| (id.to_owned(), state.to_owned()))
            .into();
        (live, health)
    }

    fn states(status: &Status) -> Vec<String> {
        status
            .servers
            .iter()
            .map(|s| format!("{} {}", s.id, s.state))
            .collect()
    }

    #[test]
    fn a_running_server_is_in_service_only_once_its_boot_reported_finished() {
        let (live, health) = live();
        let boots: BTreeMap<String, BootReport> = [
            ("i-web1".to_owned(), BootReport::Finished),
            (
                "i-cache".to_owned(),
                BootReport::Failed("starting the services (exit 1)".into()),
            ),
        ]
        .into();
        let status = status(&env(), &live, &health, Some(&boots));
        assert_eq!(
            states(&status),
            ["web-1 in_service", "web-2 booting", "cache boot_failed"]
        );
        assert_eq!(status.phase, Phase::Starting);
        assert_eq!(
            status.message,
            "cache's boot failed: starting the services (exit 1)"
        );
    }

    #[test]
    fn without_machines_running_is_enough() {
        let (live, health) = live();
        let status = status(&env(), &live, &health, None);
        assert_eq!(
            states(&status),
            ["web-1 in_service", "web-2 in_service", "cache in_service"]
        );
    }
}
