//! One local environment as the supervisor sees it: the validated configuration plus where it
//! lives, and how each server's [`ServerContext`] for the role recipes is derived from them.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use rigger_config::{Config, Environment, LocalConfig, ProviderConfig};
use rigger_recipes::{
    Layout, Network, Peer, Ports, ProjectInfo, Role, Secrets, ServerContext, Tuning,
};

use crate::paths::EnvPaths;
use crate::registry::{self, Registry, ServerRecord, subnet};

/// Ids of the stand-alone servers.
pub const CACHE: &str = "cache";
pub const QUEUE: &str = "queue";
pub const DB_PRIMARY: &str = "db-primary";

pub fn db_replica_id(n: u32) -> String {
    format!("db-replica{n}")
}

/// Ports of the environment's Erlang machinery, derived from its address block so that two
/// environments never share them: RabbitMQ checks its distribution port is free on *every*
/// address, and a distribution epmd on 4369 binds every address too.
fn erlang_ports(block: rigger_config::Cidr) -> (u16, u16) {
    let [_, b, _, _] = block.addr.octets();
    (14_000 + u16::from(b), 25_000 + u16::from(b))
}

#[derive(Debug, Clone)]
pub struct LocalEnvironment {
    pub config: Config,
    pub name: String,
    /// Directory of rigger.toml; the app path is relative to it.
    pub config_dir: PathBuf,
    /// rigger.toml itself, re-read when the supervisor is asked to reconcile.
    pub config_path: PathBuf,
    pub paths: EnvPaths,
}

impl LocalEnvironment {
    /// Where server `id`'s files are, apart from its release and venv (which its context
    /// adds): its directory, and what servers share (CA, media, static files, the
    /// environment's maintenance page, so servers launched during it serve it too).
    pub fn server_layout(&self, id: &str) -> Layout {
        let mut layout = Layout::local(self.paths.server(id), self.paths.shared());
        layout.pki_dir = self.paths.pki();
        layout.media_root = self.paths.media();
        layout.static_root = self.paths.static_root();
        layout.maintenance_dir = self.paths.maintenance();
        layout
    }

    /// Whether maintenance mode is on: the page every web server's nginx answers with.
    pub fn maintenance_on(&self) -> bool {
        self.paths.maintenance().join("maintenance.html").exists()
    }

    /// `None` when `name` is not a local environment of `config`.
    pub fn new(config: Config, name: &str, config_path: &Path) -> Option<Self> {
        let env = config.environments.get(name)?;
        if !matches!(env.provider, ProviderConfig::Local(_)) {
            return None;
        }
        let paths = EnvPaths::for_environment(&config.project.name, name);
        let config_dir = config_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let config_dir = std::fs::canonicalize(&config_dir).unwrap_or(config_dir);
        Some(LocalEnvironment {
            config,
            name: name.to_owned(),
            config_dir,
            config_path: config_path.to_path_buf(),
            paths,
        })
    }

    pub fn env(&self) -> &Environment {
        &self.config.environments[&self.name]
    }

    /// This environment with the group sizes `rigger scale` set (`desired.json`) in place of
    /// rigger.toml's `desired`, as `plan` and `up` compare against ([`DesiredCounts::resolve`]).
    /// A damaged `desired.json` is an error naming it.
    ///
    /// [`DesiredCounts::resolve`]: crate::desired::DesiredCounts::resolve
    pub fn scaled(mut self) -> std::io::Result<LocalEnvironment> {
        let counts = crate::desired::DesiredCounts::load(&self.paths.desired())?;
        let (web, worker) = counts.resolve(self.env());
        let env = self
            .config
            .environments
            .get_mut(&self.name)
            .expect("checked in LocalEnvironment::new");
        env.web.desired = web;
        env.worker.desired = worker;
        Ok(self)
    }

    pub fn local(&self) -> &LocalConfig {
        match &self.env().provider {
            ProviderConfig::Local(local) => local,
            ProviderConfig::Aws(_) => unreachable!("checked in LocalEnvironment::new"),
        }
    }

    pub fn app_source(&self) -> PathBuf {
        self.config_dir.join(&self.config.project.app_path)
    }

    pub fn requirements(&self) -> PathBuf {
        self.app_source().join(&self.config.project.requirements)
    }

    pub fn lb_address(&self) -> Ipv4Addr {
        registry::address(self.local().addresses, subnet::LOAD_BALANCER, 1)
    }

    /// The site's URL through the load balancer.
    pub fn url(&self) -> String {
        format!("https://{}:{}/", self.lb_address(), self.local().https_port)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}:{}/", self.lb_address(), self.local().http_port)
    }

    /// Database and user names: the project name with `-` made `_`, valid unquoted in SQL.
    pub fn db_name(&self) -> String {
        self.config.project.name.replace('-', "_")
    }

    /// Adds to `registry` the stand-alone servers the configuration asks for and it lacks:
    /// the cache (and queue) server, a primary when none has the role, and replicas up to the
    /// configured count. Existing servers keep their ids and roles: after a failover the
    /// promoted replica is the primary, and a new replica gets the next number (and address).
    pub fn add_missing_stand_alone_servers(
        &self,
        registry: &mut Registry,
        release: &str,
    ) -> Vec<ServerRecord> {
        let block = self.local().addresses;
        let record = |id: &str, roles: &[Role], subnet: u8, host: u8| ServerRecord {
            id: id.to_owned(),
            roles: roles.iter().map(|r| r.as_str().to_owned()).collect(),
            address: registry::address(block, subnet, host),
            release: release.to_owned(),
            state: registry::ServerState::Pending,
            beat: false,
        };
        let mut wanted = Vec::new();
        if self.env().cache.shared_with_queue {
            wanted.push(record(CACHE, &[Role::Cache, Role::Queue], subnet::CACHE, 1));
        } else {
            wanted.push(record(CACHE, &[Role::Cache], subnet::CACHE, 1));
            wanted.push(record(QUEUE, &[Role::Queue], subnet::CACHE, 2));
        }
        let mut added: Vec<ServerRecord> = wanted
            .into_iter()
            .filter(|s| registry.get(&s.id).is_none())
            .collect();
        if self.server_with_role(registry, Role::DbPrimary).is_none() {
            added.push(record(DB_PRIMARY, &[Role::DbPrimary], subnet::DATABASE, 1));
        }
        let replicas = registry
            .servers
            .iter()
            .filter(|s| s.has_role(Role::DbReplica))
            .count();
        let configured = usize::try_from(self.env().database.replicas).unwrap_or(0);
        registry.servers.extend(added.iter().cloned());
        for _ in replicas..configured {
            // Replicas take hosts from .2 on: .1 is the first primary's.
            let number = registry.next_number("db-replica");
            let mut replica = record(
                &db_replica_id(number),
                &[Role::DbReplica],
                subnet::DATABASE,
                0,
            );
            replica.address = registry.address_for(block, subnet::DATABASE, 2, number);
            registry.servers.push(replica.clone());
            added.push(replica);
        }
        added
    }

    pub fn server_with_role<'r>(
        &self,
        registry: &'r Registry,
        role: Role,
    ) -> Option<&'r ServerRecord> {
        registry.servers.iter().find(|server| server.has_role(role))
    }

    /// Everything the role recipes need to render `server`.
    pub fn context(
        &self,
        server: &ServerRecord,
        registry: &Registry,
        secrets: &Secrets,
        venv: &Path,
        release_dir: &Path,
    ) -> ServerContext {
        let project = &self.config.project;
        let block = self.local().addresses;
        let mut layout = self.server_layout(&server.id);
        layout.app_dir = release_dir.to_path_buf();
        layout.venv_dir = venv.to_path_buf();

        let address_of = |role: Role, fallback: (u8, u8)| {
            self.server_with_role(registry, role).map_or_else(
                || registry::address(block, fallback.0, fallback.1),
                |s| s.address,
            )
        };
        // The primary is whichever server has the role now (a failover moves it).
        let db_primary = self
            .server_with_role(registry, Role::DbPrimary)
            .map_or_else(
                || Peer::new(DB_PRIMARY, registry::address(block, subnet::DATABASE, 1)),
                |primary| Peer::new(primary.id.clone(), primary.address),
            );
        let mut db_replicas: Vec<Peer> = registry
            .servers
            .iter()
            .filter(|s| s.has_role(Role::DbReplica) && s.state != registry::ServerState::Unhealthy)
            .map(|s| Peer::new(s.id.clone(), s.address))
            .collect();
        // The app knows its replicas by PgBouncer database names fixed at its start (one per
        // configured replica). While a replica is missing (after a failover, during a reseed)
        // its name is served by the primary, so the app keeps working without a restart.
        let app_server = server.has_role(Role::Web) || server.has_role(Role::Worker);
        if app_server {
            let configured = usize::try_from(self.env().database.replicas).unwrap_or(0);
            while db_replicas.len() < configured {
                db_replicas.push(db_primary.clone());
            }
        }
        let web_backends = registry
            .group_members(Role::Web)
            // A starting web server joins the load balancer only once it answers its health
            // check itself (HAProxy counts a new server UP until its checks fail), except
            // during a first bring-up, when no traffic flows yet and checks may start early.
            .filter(|s| match s.state {
                registry::ServerState::InService => true,
                registry::ServerState::Pending => registry.register_pending,
                registry::ServerState::Unhealthy => false,
            })
            .map(|s| Peer::new(s.id.clone(), s.address))
            .collect();
        let network = |subnet: u8| Network::new(registry::address(block, subnet, 0), 24);
        let loopback = Network::host(Ipv4Addr::LOCALHOST);

        let local = self.local();
        let (epmd, rabbit_dist) = erlang_ports(block);
        let ports = Ports {
            lb_http: local.http_port,
            lb_https: local.https_port,
            epmd,
            rabbit_dist,
            ..Ports::default()
        };
        let db_name = self.db_name();
        ServerContext {
            server_id: server.id.clone(),
            address: server.address,
            roles: server.roles(),
            layout,
            project: ProjectInfo {
                name: project.name.clone(),
                environment: self.name.clone(),
                wsgi_module: project.wsgi_module.clone(),
                celery_app: project.celery_app.clone(),
                domains: project.domains.clone(),
                extra_server_names: vec![self.lb_address().to_string(), "localhost".into()],
                health_check_path: project.health_check_path.clone(),
                release: server.release.clone(),
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
            ports,
            peers: rigger_recipes::Peers {
                db_primary,
                db_replicas,
                redis: address_of(Role::Cache, (subnet::CACHE, 1)),
                amqp: address_of(Role::Queue, (subnet::CACHE, 1)),
                web_backends,
                // On one machine, clients that cannot choose their source address (libpq: the
                // replicas' WAL receivers, the supervisor's migrations; stunnel) connect from
                // 127.0.0.1, so it stands in for "this machine's tools". TLS and SCRAM are
                // still required on every line.
                db_client_networks: vec![
                    network(subnet::WEB),
                    network(subnet::WORKER),
                    network(subnet::DATABASE),
                    loopback,
                ],
                db_replication_networks: vec![network(subnet::DATABASE), loopback],
                // HAProxy connects to the web servers from its own address.
                load_balancer_networks: vec![Network::host(self.lb_address())],
            },
            secrets: secrets.clone(),
            tuning: local_tuning(),
            start_epmd: server.has_role(Role::Queue),
            celery_beat: server.beat,
        }
    }

    /// The load balancer is not a server of the topology's groups but runs like one.
    pub fn lb_record(&self, release: &str) -> ServerRecord {
        ServerRecord {
            id: "lb".into(),
            roles: vec![Role::Lb.as_str().to_owned()],
            address: self.lb_address(),
            release: release.to_owned(),
            state: registry::ServerState::Pending,
            beat: false,
        }
    }
}

/// Small numbers: a whole environment shares one machine (about 1 GiB with 2 web servers).
fn local_tuning() -> Tuning {
    Tuning {
        gunicorn_workers: 2,
        celery_concurrency: 2,
        nginx_worker_processes: Some(1),
        postgres_shared_buffers: "32MB".into(),
        postgres_max_connections: 60,
        postgres_max_slot_wal_keep_size: "256MB".into(),
        redis_maxmemory: Some("64mb".into()),
        rabbitmq_memory_limit: Some("256MB".into()),
        ..Tuning::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `local` of the starter file: web group `2..=4` (desired 2), worker `1..=1` (desired 1),
    /// its state under `root`.
    fn environment(root: &Path) -> LocalEnvironment {
        let config = rigger_config::parse(&rigger_config::starter("shop"), "rigger.toml").unwrap();
        let mut env = LocalEnvironment::new(config, "local", Path::new("rigger.toml")).unwrap();
        env.paths = EnvPaths::for_root_for_tests(root);
        env
    }

    #[test]
    fn scaled_counts_replace_desired_within_the_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let env = environment(dir.path());
        let unscaled = env.clone().scaled().unwrap();
        assert_eq!(
            (unscaled.env().web.desired, unscaled.env().worker.desired),
            (2, 1)
        );
        // A count set before rigger.toml's bounds shrank is brought within them.
        std::fs::write(env.paths.desired(), r#"{"web": 9, "worker": null}"#).unwrap();
        let scaled = env.scaled().unwrap();
        assert_eq!(
            (scaled.env().web.desired, scaled.env().worker.desired),
            (4, 1)
        );
    }

    #[test]
    fn a_damaged_desired_json_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let env = environment(dir.path());
        std::fs::write(env.paths.desired(), r#"{"web": "#).unwrap();
        let error = env.clone().scaled().unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("{} is damaged (", env.paths.desired().display())),
            "{error}"
        );
        assert!(
            error.contains("remove it to go back to rigger.toml's"),
            "{error}"
        );
    }

    /// Replicas number on over the environment's life; the 250th must not take the primary's
    /// address (.1), as the cycling of host numbers used to make it.
    #[test]
    fn replicas_never_take_a_live_servers_address() {
        let dir = tempfile::tempdir().unwrap();
        let env = environment(dir.path());
        let mut registry = Registry::default();
        registry.last_number.insert("db-replica".into(), 249);
        let added = env.add_missing_stand_alone_servers(&mut registry, "r1");
        let primary = registry.get(DB_PRIMARY).unwrap().address;
        let replica = added.iter().find(|s| s.id == "db-replica250").unwrap();
        assert_eq!(primary, Ipv4Addr::new(127, 77, 4, 1));
        assert_eq!(replica.address, Ipv4Addr::new(127, 77, 4, 251));
        let first = env.add_missing_stand_alone_servers(&mut Registry::default(), "r1");
        let first = first.iter().find(|s| s.id == "db-replica1").unwrap();
        assert_eq!(first.address, Ipv4Addr::new(127, 77, 4, 2));
    }
}
