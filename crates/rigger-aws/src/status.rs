//! `rigger status` for an AWS environment, in the `rigger.status` schema the local provider
//! writes (docs/status-json.md): servers by role with their state and load balancer health,
//! groups with min/desired/max, the load balancer's DNS name in `urls`. What only the
//! servers themselves know (processes, replication lag) is left empty.

pub use rigger_plan::status::{
    GroupStatus, Phase, ProcessStatus, ReplicaStatus, ServerStatus, Status,
};

use crate::environment::AwsEnvironment;
use crate::live::{Live, ROLES_TAG};

/// The status of `env` from an observation and the load balancer's instance health.
pub fn status(
    env: &AwsEnvironment,
    live: &Live,
    health: &std::collections::BTreeMap<String, String>,
) -> Status {
    let prefix = format!("{}-{}-", env.project(), env.name);
    let short = |name: &str| name.strip_prefix(&prefix).unwrap_or(name).to_owned();
    let mut servers = Vec::new();
    let mut groups = Vec::new();
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
            let state = match instance.map(|i| i.state.as_str()) {
                Some("running") if in_service => "in_service".to_owned(),
                Some("running") if member.health == "Unhealthy" => "unhealthy".to_owned(),
                Some("running") | Some("pending") => "pending".to_owned(),
                Some(other) => other.to_owned(),
                None => "unknown".to_owned(),
            };
            servers.push(ServerStatus {
                // As `rigger exec` and `ssh` name it (`servers::servers`).
                id: format!("{role}-{}", slot + 1),
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
        servers.push(ServerStatus {
            id: short(&name),
            roles: instance
                .tags
                .get(ROLES_TAG)
                .map(|r| r.split(',').map(str::to_owned).collect())
                .unwrap_or_default(),
            address: instance.private_address.clone().unwrap_or_default(),
            release: instance.tags.get("release").cloned().unwrap_or_default(),
            state: match instance.state.as_str() {
                "running" => "in_service".to_owned(),
                other => other.to_owned(),
            },
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
        maintenance: false,
        groups,
        servers,
        replication: Vec::new(),
        updated: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    }
}
