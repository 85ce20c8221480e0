//! [`ServerContext`]: everything a recipe needs to know about one server and its environment.
//!
//! Plain data, filled in by the caller (the planner) from the validated config and topology.
//! Nothing here is looked up: no clock, no DNS, no file.

use std::fmt;
use std::net::Ipv4Addr;

use serde::Serialize;

use crate::Layout;

/// One server of an environment and what it must know about the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerContext {
    /// Unique for the environment's lifetime, e.g. `web-3`. Lower-case letters, digits and
    /// `-`. Also the DNS name in the server's certificate.
    pub server_id: String,
    pub address: Ipv4Addr,
    /// Every role of the server (cache and queue share one by default).
    pub roles: Vec<Role>,
    pub layout: Layout,
    pub project: ProjectInfo,
    pub ports: Ports,
    pub peers: Peers,
    pub secrets: Secrets,
    pub tuning: Tuning,
    /// Queue servers only: run epmd as a service of the recipe, listening on `127.0.0.1` and
    /// the server's address. The local provider needs this: RabbitMQ nodes register with the
    /// epmd on 127.0.0.1, and `rabbitmqctl -n rabbit@ADDR` looks nodes up through the epmd on
    /// ADDR, so one epmd must listen on both. The epmd an Erlang node would start by itself
    /// listens where `ERL_EPMD_ADDRESS` says and outlives the node, unsupervised. On a systemd
    /// host set it to `false`: Debian's `epmd.socket` (or the node) provides it.
    pub start_epmd: bool,
    /// Worker servers only: run Celery beat here. Exactly one worker of an environment must
    /// have it, or periodic tasks run several times.
    pub celery_beat: bool,
}

/// The roles of the architecture; a server has one or more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// HAProxy, the local provider's stand-in for the cloud load balancer.
    Lb,
    /// nginx, gunicorn, PgBouncer, stunnel.
    Web,
    /// Celery worker and beat, PgBouncer, stunnel.
    Worker,
    /// Redis.
    Cache,
    /// RabbitMQ (and epmd when [`ServerContext::start_epmd`]).
    Queue,
    /// PostgreSQL primary.
    DbPrimary,
    /// PostgreSQL streaming replica.
    DbReplica,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Role::Lb,
        Role::Web,
        Role::Worker,
        Role::Cache,
        Role::Queue,
        Role::DbPrimary,
        Role::DbReplica,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Lb => "lb",
            Role::Web => "web",
            Role::Worker => "worker",
            Role::Cache => "cache",
            Role::Queue => "queue",
            Role::DbPrimary => "db-primary",
            Role::DbReplica => "db-replica",
        }
    }

    /// The secrets (of [`Secrets::NAMES`]) this role's recipe writes into its files, and so
    /// all a server of the role may read: the AWS provider gives each role's instance profile
    /// exactly these. A test renders every role and checks the list against what it uses.
    pub fn secrets(self) -> &'static [&'static str] {
        match self {
            Role::Lb => &[],
            Role::Web | Role::Worker => &[
                "db_password",
                "redis_password",
                "rabbitmq_password",
                "django_secret_key",
                "pgbouncer_admin_password",
            ],
            Role::Cache => &["redis_password"],
            Role::Queue => &["rabbitmq_password"],
            // The primary creates the app's database user with its password.
            Role::DbPrimary => &["db_password", "replication_password"],
            Role::DbReplica => &["replication_password"],
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is deployed, and names derived from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectInfo {
    pub name: String,
    pub environment: String,
    /// gunicorn's `module.path:attribute`.
    pub wsgi_module: String,
    /// As given to `celery -A`.
    pub celery_app: String,
    /// Site domains, the first canonical; a leading `.` means the domain and its subdomains
    /// (the same convention in nginx's `server_name` and Django's `ALLOWED_HOSTS`).
    pub domains: Vec<String>,
    /// More names nginx and Django accept, e.g. the local load balancer's address.
    pub extra_server_names: Vec<String>,
    /// Path the load balancer probes, e.g. `/healthcheck.html`.
    pub health_check_path: String,
    /// Release running on the server (`RIGGER_RELEASE`).
    pub release: String,
    /// Database and its owner role: letters, digits and `_`, starting with a letter or `_`.
    pub db_name: String,
    pub db_user: String,
    /// Role replicas stream with.
    pub replication_user: String,
    /// RabbitMQ user and vhost of the project (RabbitMQ's `guest` is never created).
    pub amqp_user: String,
    pub amqp_vhost: String,
    /// The `Strict-Transport-Security` header of the site's HTTPS responses; `None`: none.
    pub hsts: Option<Hsts>,
}

/// HTTP Strict Transport Security, as nginx sends it on the site's HTTPS responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Hsts {
    /// Seconds browsers keep to HTTPS; 0 makes them forget an earlier header.
    pub max_age: u32,
    /// `includeSubDomains`: every subdomain of the visited domain too.
    pub include_subdomains: bool,
}

impl Hsts {
    /// The header's value: `max-age=N`, then `; includeSubDomains` when asked (never
    /// `preload`: a commitment to browsers' lists that rigger does not make).
    pub fn header_value(&self) -> String {
        let mut value = format!("max-age={}", self.max_age);
        if self.include_subdomains {
            value.push_str("; includeSubDomains");
        }
        value
    }
}

impl ProjectInfo {
    /// The first domain without its wildcard dot: the `Host` health checks are sent with.
    pub fn canonical_domain(&self) -> &str {
        self.domains
            .first()
            .map(|d| d.trim_start_matches('.'))
            .unwrap_or("localhost")
    }

    /// `domains` then `extra_server_names`: nginx's `server_name`, Django's `ALLOWED_HOSTS`.
    pub fn server_names(&self) -> Vec<String> {
        self.domains
            .iter()
            .chain(&self.extra_server_names)
            .cloned()
            .collect()
    }
}

/// Every port the architecture uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ports {
    pub nginx_http: u16,
    pub nginx_https: u16,
    pub gunicorn: u16,
    pub pgbouncer: u16,
    /// stunnel's local port for the primary; replica N (from 1) gets `stunnel_base + N`.
    pub stunnel_base: u16,
    pub postgres: u16,
    /// Redis over TLS (its plain port is closed).
    pub redis_tls: u16,
    /// RabbitMQ's AMQP over TLS (AMQPS; its plain AMQP port is closed).
    pub amqps: u16,
    pub rabbit_dist: u16,
    pub epmd: u16,
    /// The load balancer's plain port. Locally HAProxy listens on it; on AWS it is 80.
    pub lb_http: u16,
    /// The load balancer's TLS port, also the port of the `https://` URLs nginx redirects
    /// to. Locally HAProxy listens on it; on AWS it is 443.
    pub lb_https: u16,
}

impl Default for Ports {
    fn default() -> Ports {
        Ports {
            nginx_http: 80,
            nginx_https: 443,
            gunicorn: 8000,
            pgbouncer: 6432,
            stunnel_base: 7432,
            postgres: 5432,
            redis_tls: 6380,
            amqps: 5671,
            rabbit_dist: 25672,
            epmd: 4369,
            lb_http: 80,
            lb_https: 443,
        }
    }
}

/// The other servers this one talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peers {
    pub db_primary: Peer,
    /// In order: replica N (from 1) is `db_replicas[N - 1]`, reached through PgBouncer database
    /// `<db>_replicaN` and stunnel port `stunnel_base + N`.
    pub db_replicas: Vec<Peer>,
    pub redis: Ipv4Addr,
    pub amqp: Ipv4Addr,
    /// Web servers behind the load balancer.
    pub web_backends: Vec<Peer>,
    /// Networks the app's database connections come from: the web and worker servers' stunnel
    /// clients, which connect from their server's address.
    pub db_client_networks: Vec<Network>,
    /// Networks replication connections come from: every database server, since any replica
    /// may be promoted. libpq cannot choose its source address, so on the local provider
    /// (where a connection between two loopback addresses comes from `127.0.0.1`) this must
    /// include `127.0.0.1/32`.
    pub db_replication_networks: Vec<Network>,
    /// Where the load balancer's requests come from: nginx takes the client's address from
    /// `X-Forwarded-For` only on connections from these networks.
    pub load_balancer_networks: Vec<Network>,
}

/// Another server, by id (its certificate's name) and address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub id: String,
    pub address: Ipv4Addr,
}

impl Peer {
    pub fn new(id: impl Into<String>, address: Ipv4Addr) -> Peer {
        Peer {
            id: id.into(),
            address,
        }
    }
}

/// An IPv4 network, `addr/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Network {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Network {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Network {
        Network { addr, prefix }
    }

    /// The network of one address.
    pub fn host(addr: Ipv4Addr) -> Network {
        Network { addr, prefix: 32 }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A secret value, or on AWS a placeholder for one. Opaque to recipes: only ever written into
/// files flagged [`crate::FileSpec::contains_secret`], with mode 0600. `Debug` does not show it.
///
/// Placeholders must use only `A-Z a-z 0-9 _ -` so that every encoding a recipe applies
/// (URL, SQL, config quoting) leaves them intact for later substitution.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Secret values of the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secrets {
    /// Password of [`ProjectInfo::db_user`].
    pub db_password: Secret,
    /// Password of [`ProjectInfo::replication_user`].
    pub replication_password: Secret,
    pub redis_password: Secret,
    /// Password of [`ProjectInfo::amqp_user`].
    pub rabbitmq_password: Secret,
    pub django_secret_key: Secret,
    /// Password of [`PGBOUNCER_ADMIN_USER`], PgBouncer's admin console user: rigger's, not the
    /// app's, so the app cannot pause its own pooler.
    pub pgbouncer_admin_password: Secret,
}

/// The user rigger reaches PgBouncer's admin console as (PAUSE, RESUME, SHOW POOLS).
pub const PGBOUNCER_ADMIN_USER: &str = "rigger_pgbouncer_admin";

impl Secrets {
    /// Every secret's name, as providers store them (a file each, an SSM parameter each).
    pub const NAMES: [&'static str; 6] = [
        "db_password",
        "replication_password",
        "redis_password",
        "rabbitmq_password",
        "django_secret_key",
        "pgbouncer_admin_password",
    ];

    pub fn named(&self) -> [(&'static str, &Secret); 6] {
        [
            ("db_password", &self.db_password),
            ("replication_password", &self.replication_password),
            ("redis_password", &self.redis_password),
            ("rabbitmq_password", &self.rabbitmq_password),
            ("django_secret_key", &self.django_secret_key),
            ("pgbouncer_admin_password", &self.pgbouncer_admin_password),
        ]
    }

    /// The secrets, each from `value(name)` in the order of [`Self::NAMES`].
    pub fn try_from_names<E>(
        mut value: impl FnMut(&'static str) -> Result<Secret, E>,
    ) -> Result<Secrets, E> {
        Ok(Secrets {
            db_password: value("db_password")?,
            replication_password: value("replication_password")?,
            redis_password: value("redis_password")?,
            rabbitmq_password: value("rabbitmq_password")?,
            django_secret_key: value("django_secret_key")?,
            pgbouncer_admin_password: value("pgbouncer_admin_password")?,
        })
    }
}

/// Sizes and counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tuning {
    pub gunicorn_workers: u32,
    /// Seconds before gunicorn kills a stuck worker; nginx waits a little longer.
    pub gunicorn_timeout: u32,
    pub celery_concurrency: u32,
    /// nginx `worker_processes`; `None` is `auto` (one per CPU).
    pub nginx_worker_processes: Option<u32>,
    /// PostgreSQL `shared_buffers`, e.g. `128MB`.
    pub postgres_shared_buffers: String,
    pub postgres_max_connections: u32,
    /// Cap on WAL kept for replication slots, e.g. `2GB`, so that a lost replica cannot fill
    /// the primary's disk.
    pub postgres_max_slot_wal_keep_size: String,
    /// Redis `maxmemory` (e.g. `256mb`, evicting least recently used keys); `None`: no cap.
    pub redis_maxmemory: Option<String>,
    /// RabbitMQ `vm_memory_high_watermark.absolute` (e.g. `512MB`); `None`: RabbitMQ's
    /// default, 40% of the machine's memory (too much when many nodes share a machine).
    pub rabbitmq_memory_limit: Option<String>,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            gunicorn_workers: 4,
            gunicorn_timeout: 30,
            celery_concurrency: 4,
            nginx_worker_processes: None,
            postgres_shared_buffers: "128MB".into(),
            postgres_max_connections: 100,
            postgres_max_slot_wal_keep_size: "2GB".into(),
            redis_maxmemory: None,
            rabbitmq_memory_limit: None,
        }
    }
}
