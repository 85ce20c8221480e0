//! The environment's running servers as `rigger exec`, `manage`, `logs` and `ssh` name and
//! reach them: [`servers`] maps an observation ([`Live`]) onto one [`LiveServer`] per running
//! instance, with its roles, state and addresses. A pure function of the observation; the
//! CLI turns each into an SSH target.
//!
//! Ids are what one types on a command line: a group's servers are `web-1`, `web-2`,
//! `worker-1` (slot order: launch time, then instance id, as `<group>[n]` in a plan), and
//! stand-alone servers their name without the `<project>-<env>-` prefix (`cache`,
//! `db-primary`, `db-replica1`), as on the local provider. Slots follow the group: when
//! `web-1` is replaced, the next oldest becomes `web-1`. Each server also answers to its
//! instance id and to its name in `rigger status` (`web[1]`), its aliases.
//! [`crate::Provider::servers`] adds the SSH host keys each one published.

use serde::Serialize;

use crate::environment::AwsEnvironment;
use crate::live::{Live, ROLES_TAG};

/// One running instance of the environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveServer {
    /// `web-1`, `worker-2`, `cache`, `db-primary`, `db-replica1`; a second instance claiming
    /// a stand-alone server's name (an interrupted replacement) is its instance id.
    pub id: String,
    /// Other names the server answers to: its instance id, and `web[1]` for a group server.
    pub aliases: Vec<String>,
    /// The EC2 instance id.
    pub instance_id: String,
    /// Recipe roles: `web`, `worker`, `cache`, `queue`, `db-primary`, `db-replica`.
    pub roles: Vec<String>,
    /// `in_service`, `pending` (a group server not in service yet) or `unhealthy`.
    pub state: String,
    pub public_address: Option<String>,
    pub private_address: Option<String>,
    /// The SSH host keys the server published at boot (one public key a line,
    /// [`crate::hostkeys`]); `None` until it has, or when it never will (it was launched
    /// before rigger pinned host keys). Filled by [`crate::Provider::servers`].
    pub host_keys: Option<String>,
    /// The SSM parameter the server publishes them in.
    pub host_keys_parameter: String,
}

/// The running servers of `env` in `live`: the groups' in slot order (groups by name), then
/// the stand-alone servers by name. Instances that are not running (pending, stopping,
/// stopped) cannot be reached and are left out, as are group members whose instance was not
/// observed (untagged).
pub fn servers(env: &AwsEnvironment, live: &Live) -> Vec<LiveServer> {
    let prefix = format!("{}-{}-", env.project(), env.name);
    let short = |name: &str| name.strip_prefix(&prefix).unwrap_or(name).to_owned();
    let mut servers = Vec::new();
    for (name, group) in &live.groups {
        let role = short(name);
        for (slot, member) in group.instances.iter().enumerate() {
            let Some(instance) = live.instances.get(&member.id) else {
                continue;
            };
            if instance.state != "running" {
                continue;
            }
            let state = if member.health == "Unhealthy" {
                "unhealthy"
            } else if member.lifecycle == "InService" {
                "in_service"
            } else {
                "pending"
            };
            servers.push(LiveServer {
                id: format!("{role}-{}", slot + 1),
                aliases: vec![instance.id.clone(), format!("{role}[{}]", slot + 1)],
                instance_id: instance.id.clone(),
                roles: vec![role.clone()],
                state: state.to_owned(),
                public_address: instance.public_address.clone(),
                private_address: instance.private_address.clone(),
                host_keys: None,
                host_keys_parameter: crate::hostkeys::parameter(env, &instance.id),
            });
        }
    }
    for (name, instances) in live.stand_alone_instances() {
        for (index, instance) in instances.iter().enumerate() {
            if instance.state != "running" {
                continue;
            }
            let (id, aliases) = if index == 0 {
                (short(&name), vec![instance.id.clone()])
            } else {
                (instance.id.clone(), Vec::new())
            };
            servers.push(LiveServer {
                id,
                aliases,
                instance_id: instance.id.clone(),
                roles: instance
                    .tags
                    .get(ROLES_TAG)
                    .map(|r| r.split(',').map(str::to_owned).collect())
                    .unwrap_or_default(),
                state: "in_service".to_owned(),
                public_address: instance.public_address.clone(),
                private_address: instance.private_address.clone(),
                host_keys: None,
                host_keys_parameter: crate::hostkeys::parameter(env, &instance.id),
            });
        }
    }
    servers
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::live::{GroupInstance, LiveGroup, LiveInstance};

    /// Fixtures the status tests share.
    pub(crate) fn env() -> AwsEnvironment {
        let text = r#"
[project]
name = "shop"
app_path = "."
wsgi_module = "shop.wsgi:application"
celery_app = "shop"
domains = ["shop.example.com"]

[environments.prod]
provider = "aws"
region = "us-east-1"
ami = "ami-12345678"
certificate = "arn:aws:iam::123456789012:server-certificate/x"
"#;
        let config = rigger_config::parse(text, "rigger.toml").unwrap();
        AwsEnvironment::new(config, "prod").unwrap()
    }

    pub(crate) fn instance(
        id: &str,
        state: &str,
        public: Option<&str>,
        tags: &[(&str, &str)],
    ) -> LiveInstance {
        LiveInstance {
            id: id.into(),
            state: state.into(),
            private_address: Some(format!("10.0.0.{}", id.len())),
            public_address: public.map(str::to_owned),
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .chain([
                    ("project".to_owned(), "shop".to_owned()),
                    ("environment".to_owned(), "prod".to_owned()),
                ])
                .collect(),
            ..LiveInstance::default()
        }
    }

    pub(crate) fn member(id: &str, lifecycle: &str, health: &str) -> GroupInstance {
        GroupInstance {
            id: id.into(),
            lifecycle: lifecycle.into(),
            health: health.into(),
            ..GroupInstance::default()
        }
    }

    fn summary(servers: &[LiveServer]) -> Vec<String> {
        servers
            .iter()
            .map(|s| {
                format!(
                    "{} {:?} {} {} {:?} {}",
                    s.id,
                    s.aliases,
                    s.roles.join(","),
                    s.state,
                    s.public_address,
                    s.host_keys_parameter
                )
            })
            .collect()
    }

    #[test]
    fn group_servers_are_numbered_by_slot_and_stand_alone_ones_named() {
        let group = [("aws:autoscaling:groupName", "shop-prod-web")];
        let mut live = Live::default();
        for i in [
            instance("i-web1", "running", Some("54.0.0.1"), &group),
            instance("i-web2", "running", None, &group),
            instance("i-web3", "stopped", Some("54.0.0.3"), &group),
            instance(
                "i-cache",
                "running",
                Some("54.0.0.9"),
                &[("Name", "shop-prod-cache"), ("roles", "cache,queue")],
            ),
            instance(
                "i-stray",
                "running",
                None,
                &[("Name", "shop-prod-cache"), ("roles", "cache,queue")],
            ),
        ] {
            live.instances.insert(i.id.clone(), i);
        }
        live.instances.get_mut("i-stray").unwrap().launched = (1, 0);
        live.instances.get_mut("i-cache").unwrap().launched = (2, 0);
        live.groups.insert(
            "shop-prod-web".into(),
            LiveGroup {
                instances: vec![
                    member("i-web1", "InService", "Healthy"),
                    member("i-web2", "Pending", "Healthy"),
                    member("i-web3", "InService", "Healthy"),
                    member("i-gone", "InService", "Unhealthy"),
                ],
                attached: ["i-web1", "i-web2", "i-web3", "i-gone"]
                    .map(String::from)
                    .into(),
                ..LiveGroup::default()
            },
        );
        assert_eq!(
            summary(&servers(&env(), &live)),
            [
                r#"web-1 ["i-web1", "web[1]"] web in_service Some("54.0.0.1") /shop/prod/hostkeys/i-web1"#,
                r#"web-2 ["i-web2", "web[2]"] web pending None /shop/prod/hostkeys/i-web2"#,
                r#"cache ["i-cache"] cache,queue in_service Some("54.0.0.9") /shop/prod/hostkeys/i-cache"#,
                r#"i-stray [] cache,queue in_service None /shop/prod/hostkeys/i-stray"#,
            ]
        );
    }
}
