//! One AWS environment: the validated configuration, the network it lives in (the region's
//! default VPC and its subnets), where each stand-alone server goes, and how each server's
//! [`ServerContext`] for the role recipes is derived.
//!
//! Stand-alone servers (cache/queue, database primary and replicas) get fixed private
//! addresses, computed from their subnet: the group servers' user-data is rendered before any
//! of them exists, and a replaced database keeps its address. They are taken from the top of
//! the subnet (10 below its last usable address and down), where EC2 assigns addresses last.
//! A group server's own id and address are known only at boot: its recipe is rendered with
//! [`SELF_ID`] and [`SELF_ADDRESS`] and the user-data substitutes the instance's values.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use rigger_config::{AwsConfig, Config, Environment, ProviderConfig};
use rigger_recipes::{
    Layout, Network as RecipeNetwork, Peer, Peers, Ports, ProjectInfo, Secret, Secrets,
    ServerContext, Tuning,
};
use rigger_topology::{Names, Role};

/// The id a group server's recipe is rendered with; replaced by the instance id at boot.
pub const SELF_ID: &str = "rigger-self-id";
/// The address a group server's recipe is rendered with (TEST-NET-1, which no real network
/// uses); replaced by the instance's private address at boot.
pub const SELF_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 123);

/// The secrets every environment has, by SSM parameter name (under `/<project>/<env>/`).
pub const SECRET_NAMES: [&str; 6] = Secrets::NAMES;
/// The environment CA's key and certificate, also in SSM: rigger signs each stand-alone
/// server's certificate with the key before the server starts ([`crate::secrets`]); servers
/// may read only the certificate.
pub const CA_KEY: &str = rigger_topology::parameter::CA_KEY;
pub const CA_CERT: &str = rigger_topology::parameter::CA_CERT;

/// The placeholder a recipe gets instead of secret `name`; only `A-Z 0-9 _`, so every
/// encoding a recipe applies leaves it intact for the substitution at boot.
pub fn secret_placeholder(name: &str) -> String {
    format!("RIGGER_SECRET_{}_", name.to_ascii_uppercase())
}

/// An IPv4 network: the project's one type for them.
pub use rigger_config::Cidr;

/// The last address of `subnet` AWS lets an instance use (the very last one is reserved).
pub(crate) fn last_usable(subnet: Cidr) -> u32 {
    u32::from(subnet.broadcast()) - 1
}

/// A subnet of the environment's VPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subnet {
    pub id: String,
    pub zone: String,
    pub cidr: Cidr,
}

/// Where the environment lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub vpc_id: String,
    pub vpc_cidr: Cidr,
    /// Sorted by availability zone: subnet 0 is the first zone's.
    pub subnets: Vec<Subnet>,
}

/// A stand-alone server of the topology, placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandAlone {
    /// `cache`, `queue`, `db-primary`, `db-replica1`, ...: the recipes' server id.
    pub id: String,
    /// The topology's name, `<project>-<env>-<id>`: the instance's `Name` tag.
    pub name: String,
    pub role: Role,
    pub roles: Vec<Role>,
    /// Index into [`Network::subnets`].
    pub subnet: usize,
    pub address: Ipv4Addr,
}

/// Where a stand-alone server really is when that is no longer what the configuration
/// implies: after a failover the primary is the former `db-replica1` (its recipe id, which
/// its certificate and replication slot name, and its address), and the replica rebuilt
/// next to it needs an id and an address nobody holds. See [`crate::database::placements`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub id: String,
    pub address: Ipv4Addr,
}

/// An AWS environment of the configuration.
#[derive(Debug, Clone)]
pub struct AwsEnvironment {
    pub config: Config,
    pub name: String,
    pub names: Names,
    /// Stand-alone servers placed elsewhere than the configuration implies, by the
    /// topology's name (empty until a failover; [`crate::apply::apply`] fills it from what
    /// it observes).
    pub placements: BTreeMap<String, Placement>,
}

impl AwsEnvironment {
    /// `None` when `name` is not an AWS environment of `config`.
    pub fn new(config: Config, name: &str) -> Option<AwsEnvironment> {
        let env = config.environments.get(name)?;
        if !matches!(env.provider, ProviderConfig::Aws(_)) {
            return None;
        }
        Some(AwsEnvironment {
            names: Names::new(&config.project.name, name),
            config,
            name: name.to_owned(),
            placements: BTreeMap::new(),
        })
    }

    /// The same environment with its stand-alone servers placed as `placements` says.
    pub fn with_placements(&self, placements: BTreeMap<String, Placement>) -> AwsEnvironment {
        AwsEnvironment {
            placements,
            ..self.clone()
        }
    }

    pub fn env(&self) -> &Environment {
        &self.config.environments[&self.name]
    }

    pub fn aws(&self) -> &AwsConfig {
        match &self.env().provider {
            ProviderConfig::Aws(aws) => aws,
            ProviderConfig::Local(_) => unreachable!("checked in AwsEnvironment::new"),
        }
    }

    pub fn project(&self) -> &str {
        &self.config.project.name
    }

    /// SSM parameter path of secret `name`: `/<project>/<env>/<name>`.
    pub fn parameter(&self, name: &str) -> String {
        format!("{}{name}", self.parameter_prefix())
    }

    pub fn parameter_prefix(&self) -> String {
        format!("/{}/{}/", self.project(), self.name)
    }

    /// Database and user names: the project name with `-` made `_`.
    pub fn db_name(&self) -> String {
        self.project().replace('-', "_")
    }

    /// The stand-alone servers the configuration asks for, placed in `network`.
    pub fn stand_alone_servers(&self, network: &Network) -> Vec<StandAlone> {
        let env = self.env();
        let mut wanted: Vec<(String, Role, Vec<Role>)> = Vec::new();
        if env.cache.shared_with_queue {
            wanted.push(("cache".into(), Role::Cache, vec![Role::Cache, Role::Queue]));
        } else {
            wanted.push(("cache".into(), Role::Cache, vec![Role::Cache]));
            wanted.push(("queue".into(), Role::Queue, vec![Role::Queue]));
        }
        wanted.push(("db-primary".into(), Role::DbPrimary, vec![Role::DbPrimary]));
        for n in 1..=env.database.replicas {
            wanted.push((
                format!("db-replica{n}"),
                Role::DbReplica,
                vec![Role::DbReplica],
            ));
        }
        let zones = network.subnets.len().max(1);
        wanted
            .into_iter()
            .enumerate()
            .map(|(index, (id, role, roles))| {
                // Replica n goes to zone n, so the database survives the loss of one zone.
                let subnet = match id.strip_prefix("db-replica") {
                    Some(n) => n.parse::<usize>().unwrap_or(0) % zones,
                    None => 0,
                };
                let address = network
                    .subnets
                    .get(subnet)
                    .map_or(Ipv4Addr::UNSPECIFIED, |s| {
                        Ipv4Addr::from(last_usable(s.cidr) - 10 - index as u32)
                    });
                let name = self.names.server(&id);
                let (id, address) = match self.placements.get(&name) {
                    Some(placed) => (placed.id.clone(), placed.address),
                    None => (id, address),
                };
                StandAlone {
                    name,
                    id,
                    role,
                    roles,
                    subnet,
                    address,
                }
            })
            .collect()
    }

    /// Secrets as the recipes see them on AWS: placeholders, replaced at boot by the values
    /// the instance reads from SSM.
    pub fn placeholder_secrets() -> Secrets {
        Secrets::try_from_names(|name| {
            Ok::<_, std::convert::Infallible>(Secret::new(secret_placeholder(name)))
        })
        .unwrap_or_else(|never| match never {})
    }

    /// Everything the role recipes need to render a server of role `roles`: a stand-alone
    /// server (`Some(server)`) or a group server (`None`: rendered with [`SELF_ID`] and
    /// [`SELF_ADDRESS`]).
    pub fn context(
        &self,
        network: &Network,
        roles: &[Role],
        server: Option<&StandAlone>,
        release: &str,
    ) -> ServerContext {
        let project = &self.config.project;
        let servers = self.stand_alone_servers(network);
        let with_role = |role: Role| {
            servers
                .iter()
                .find(|s| s.roles.contains(&role))
                .map_or(Ipv4Addr::UNSPECIFIED, |s| s.address)
        };
        let db_primary = servers
            .iter()
            .find(|s| s.role == Role::DbPrimary)
            .map(|s| Peer::new(s.id.clone(), s.address))
            .unwrap_or_else(|| Peer::new("db-primary", Ipv4Addr::UNSPECIFIED));
        let db_replicas = servers
            .iter()
            .filter(|s| s.role == Role::DbReplica)
            .map(|s| Peer::new(s.id.clone(), s.address))
            .collect();
        let vpc = RecipeNetwork::new(network.vpc_cidr.addr, network.vpc_cidr.prefix);
        let db_name = self.db_name();
        let (server_id, address) = match server {
            Some(server) => (server.id.clone(), server.address),
            None => (SELF_ID.to_owned(), SELF_ADDRESS),
        };
        let is_worker = roles.contains(&Role::Worker);
        ServerContext {
            server_id,
            address,
            roles: roles.to_vec(),
            layout: Layout::systemd(project.name.as_str()),
            project: ProjectInfo {
                name: project.name.clone(),
                environment: self.name.clone(),
                wsgi_module: project.wsgi_module.clone(),
                celery_app: project.celery_app.clone(),
                domains: project.domains.clone(),
                extra_server_names: Vec::new(),
                health_check_path: project.health_check_path.clone(),
                release: release.to_owned(),
                db_name: db_name.clone(),
                db_user: db_name.clone(),
                replication_user: "replicator".into(),
                amqp_user: db_name.clone(),
                amqp_vhost: db_name,
                hsts: self.env().hsts.map(|h| rigger_recipes::Hsts {
                    max_age: h.max_age,
                    include_subdomains: h.include_subdomains,
                }),
            },
            ports: Ports::default(),
            peers: Peers {
                db_primary,
                db_replicas,
                redis: with_role(Role::Cache),
                amqp: with_role(Role::Queue),
                // The cloud load balancer finds the web servers itself.
                web_backends: Vec::new(),
                db_client_networks: vec![vpc],
                db_replication_networks: vec![vpc],
                // The load balancer's nodes have their addresses in the VPC's subnets.
                load_balancer_networks: vec![vpc],
            },
            secrets: Self::placeholder_secrets(),
            tuning: Tuning::default(),
            // rigger's own epmd, on the queue server's address and loopback only, as locally;
            // user-data masks Debian's epmd.socket, which listens on every address.
            start_epmd: true,
            // Exactly one worker may run beat: only a group that can never grow past one
            // server gets it (see docs/aws.md).
            celery_beat: is_worker && self.env().worker.max <= 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_addresses_come_from_the_top_of_the_subnet() {
        let cidr: Cidr = "172.31.0.0/20".parse().unwrap();
        assert_eq!(
            Ipv4Addr::from(last_usable(cidr)),
            Ipv4Addr::new(172, 31, 15, 254)
        );
    }
}
