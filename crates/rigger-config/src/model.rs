//! The validated model of `rigger.toml`.
//!
//! Every value here has already been checked: counts are in range, CIDRs parse, provider-specific
//! keys appear only under their provider. Code downstream (topology, recipes, providers) trusts
//! these types and never re-validates. Defaults are applied during validation, so an `Option`
//! here means "genuinely absent", never "use the default".

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::Serialize;

/// A whole, valid `rigger.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    pub project: Project,
    /// Environments by name, in name order.
    pub environments: BTreeMap<String, Environment>,
}

/// The `[project]` table: what is deployed, independent of where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Project {
    /// Lower-case letters, digits and `-`; starts with a letter. Prefixes every resource name.
    pub name: String,
    /// Directory holding the Django project (`manage.py`), relative to the config file.
    pub app_path: PathBuf,
    /// WSGI callable, `module.path:attribute` (gunicorn's syntax).
    pub wsgi_module: String,
    /// The Celery application, as given to `celery -A`.
    pub celery_app: String,
    /// Site domains; the first is canonical. A leading `.` means the domain and its subdomains.
    pub domains: Vec<String>,
    /// Path the load balancer probes; default `/healthcheck.html`.
    pub health_check_path: String,
    /// pip requirements file, relative to `app_path`; default `requirements.txt`.
    pub requirements: PathBuf,
}

/// One `[environments.NAME]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Environment {
    pub name: String,
    pub provider: ProviderConfig,
    pub web: GroupSizing,
    pub worker: GroupSizing,
    pub database: DatabaseConfig,
    pub cache: CacheConfig,
    /// `hsts_max_age` (and `hsts_include_subdomains`): the `Strict-Transport-Security` header
    /// the web servers add to every HTTPS response; `None` (the default) sends none.
    pub hsts: Option<Hsts>,
}

/// HTTP Strict Transport Security: browsers that saw the header reach the site's domains only
/// over HTTPS for `max_age` seconds. Off unless asked for: a browser remembers it, so a local
/// environment with its own CA (or a domain not yet on HTTPS everywhere) would stay pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Hsts {
    /// Seconds, `0..=MAX_AGE_LIMIT`; 0 tells browsers to forget an earlier header.
    pub max_age: u32,
    /// Also every subdomain of the domain a browser visited (`includeSubDomains`).
    pub include_subdomains: bool,
}

impl Hsts {
    /// Two years: the longest `max-age` browsers honour, and what HSTS preload lists ask for.
    pub const MAX_AGE_LIMIT: u32 = 63_072_000;
}

impl Environment {
    pub fn provider_kind(&self) -> ProviderKind {
        match self.provider {
            ProviderConfig::Local(_) => ProviderKind::Local,
            ProviderConfig::Aws(_) => ProviderKind::Aws,
        }
    }

    /// Checks a desired count for group `group` (`web` or `worker`, as `rigger scale` names
    /// them) against its bounds; the error says what is wrong and where to change it.
    pub fn check_scale(&self, group: &str, count: u32) -> Result<(), String> {
        let sizing = match group {
            "web" => &self.web,
            "worker" => &self.worker,
            other => {
                return Err(format!(
                    "no group `{other}`: the groups are `web` and `worker`"
                ));
            }
        };
        if count < sizing.min || count > sizing.max {
            return Err(format!(
                "{group}={count} is outside the group's bounds {}..={} (set [environments.{}.{group}] min/max in rigger.toml)",
                sizing.min, sizing.max, self.name
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Local,
    Aws,
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProviderKind::Local => "local",
            ProviderKind::Aws => "aws",
        })
    }
}

/// Provider-specific settings; which variant is chosen by `provider = "..."`.
// A config is read once per command: the AWS variant's size does not matter, and boxing it
// would only make every match and constructor noisier.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "provider", rename_all = "lowercase")]
pub enum ProviderConfig {
    Local(LocalConfig),
    Aws(AwsConfig),
}

/// Settings of `provider = "local"`: the whole topology on this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocalConfig {
    /// Port standing in for the load balancer's port 80; default 8080.
    pub http_port: u16,
    /// Port standing in for the load balancer's port 443; default 8443.
    pub https_port: u16,
    /// Loopback block the environment's servers take their addresses from; a `/16` inside
    /// `127.0.0.0/8`, default `127.77.0.0/16`. Two environments up at once need distinct blocks.
    pub addresses: Cidr,
}

/// Settings of `provider = "aws"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AwsConfig {
    pub region: String,
    /// AMI id (`ami-` followed by hex digits).
    pub ami: String,
    pub load_balancer: LoadBalancerKind,
    /// ARN of the ACM or IAM server certificate the load balancer's 443 listener presents.
    pub certificate: Option<String>,
    /// Networks allowed to reach port 22 of every server. Empty means SSH is closed.
    pub admin_cidrs: Vec<Cidr>,
    /// VPC id (`vpc-...`); `None` means the region's default VPC.
    pub vpc: Option<String>,
    /// Subnet ids the servers are spread over; empty means the VPC's default subnets.
    pub subnets: Vec<String>,
    /// The SSH key pair every server is started with; `None` for none.
    pub key_pair: Option<KeyPair>,
    /// Instance profile the servers run with; `None` means rigger creates
    /// `<project>-<env>-instance` (role and profile) allowing what the servers need.
    pub instance_profile: Option<String>,
    /// Average CPU (percent, 1..=100) the groups' target-tracking policies aim at; default 50.
    pub cpu_target: u32,
    /// What the Auto Scaling groups launch from; default launch templates.
    pub launch: LaunchKind,
    /// The user rigger logs in as over SSH (`rigger exec`, `ssh`, ...); default `admin`, the
    /// Debian AMIs' user. A valid unix user name.
    pub deploy_user: String,
    /// The private key SSH uses, as written: relative to rigger.toml, absolute, or under `~/`.
    /// Whether it exists is checked when it is used. `None` lets `ssh` use the agent and its
    /// default keys.
    pub ssh_identity: Option<PathBuf>,
    /// The jump host servers are reached through, at their private addresses; `None` reaches
    /// each at its public address.
    pub bastion: Option<Bastion>,
    /// The port of the servers' sshd; default 22.
    pub ssh_port: u16,
}

/// `bastion = "user@host[:port]"`: a jump host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bastion {
    pub user: String,
    /// A DNS name or an IP address (IPv6 without its brackets).
    pub host: String,
    /// Default 22.
    pub port: u16,
}

/// The SSH key pair of an AWS environment's servers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyPair {
    /// `key_pair`: the name of a key pair that already exists in the region; rigger never
    /// changes or deletes it.
    Existing(String),
    /// `admin_public_key`: an OpenSSH public key, imported by rigger as the key pair
    /// `<project>-<env>`. Holds `type base64`, without the comment.
    Import(String),
}

/// `launch = "..."`: what an Auto Scaling group launches its servers from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LaunchKind {
    /// A launch template per release (the default).
    Template,
    /// Legacy: a launch configuration per release, named with the UTC time it was made, as
    /// the seed architecture did. New AWS accounts cannot create them.
    Configuration,
}

impl fmt::Display for LaunchKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LaunchKind::Template => "template",
            LaunchKind::Configuration => "configuration",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadBalancerKind {
    /// Classic Elastic Load Balancer, as in the seed architecture.
    Classic,
    /// Application Load Balancer with a target group.
    Application,
}

impl fmt::Display for LoadBalancerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoadBalancerKind::Classic => "classic",
            LoadBalancerKind::Application => "application",
        })
    }
}

/// Size of an auto-scaled group (`[environments.NAME.web]`, `.worker`).
/// Invariant: `1 <= min <= desired <= max` for web; `min` may be 0 for nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupSizing {
    pub min: u32,
    pub max: u32,
    pub desired: u32,
    pub instance_type: String,
    /// Data volume size in GiB.
    pub volume_size: u32,
}

impl GroupSizing {
    /// The most servers `min`, `max` and `desired` may ask for on AWS. Every server of a group
    /// is a resource of the plan (`web[1]`, `web[2]`, ...); a larger number is a typo, and far
    /// beyond any account's default EC2 quota.
    pub const MAX_SERVERS: u32 = 1000;
    /// The most servers a local group may have. A group's servers take their addresses from
    /// the 250 hosts of its `/24` of the environment's block (`127.B.1.N` web, `127.B.2.N`
    /// worker), numbered for the environment's lifetime, and a rolling deploy runs up to twice
    /// `max` at once (a whole batch of new servers beside the old ones); 100 leaves headroom.
    pub const MAX_LOCAL_SERVERS: u32 = 100;
}

/// `[environments.NAME.database]`: one primary and `replicas` streaming replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DatabaseConfig {
    /// Number of streaming replicas; default 1.
    pub replicas: u32,
    pub instance_type: String,
    pub volume_size: u32,
}

impl DatabaseConfig {
    /// The most streaming replicas an environment may have. Each replica holds one of the
    /// primary's WAL senders, and PostgreSQL runs with `max_wal_senders = 10`
    /// (`rigger_recipes::MAX_WAL_SENDERS`; rigger-local's `tests/config_limits.rs` ties the
    /// two): a replica being rebuilt takes two (its base backup and its WAL stream) while the
    /// others keep streaming, so 8 replicas always fit.
    pub const MAX_REPLICAS: u32 = 8;
}

/// `[environments.NAME.cache]`: Redis and RabbitMQ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheConfig {
    /// Redis and RabbitMQ on one server (default, as in the seed) or on two.
    pub shared_with_queue: bool,
    pub instance_type: String,
    pub volume_size: u32,
}

/// An IPv4 network in CIDR notation, host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    /// The network open to every address.
    pub const ANYWHERE: Cidr = Cidr {
        addr: Ipv4Addr::UNSPECIFIED,
        prefix: 0,
    };
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
