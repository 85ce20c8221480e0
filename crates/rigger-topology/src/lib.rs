//! The seed's architecture as data.
//!
//! [`desired`] turns a validated [`rigger_config::Config`] and an environment name into the
//! list of [`Resource`]s that environment should consist of: security groups per role, on AWS the
//! imported key pair and an instance profile per server role, the load balancer, a launch template (or
//! legacy launch configuration) per release, Auto Scaling groups and their servers, the
//! cache/queue server(s), the database primary and replicas with their data volumes. Everything
//! carries the tags `project`, `environment`, `role` and `release`.
//!
//! A group's desired count belongs to scaling once the group exists: [`desired_scaled`] takes
//! the counts a provider observed and uses them, brought within `min..=max`, instead of
//! rigger.toml's `desired`.
//!
//! This crate is pure: no I/O, no clock. Providers turn the same resources into real things
//! (EC2 objects on AWS, directories and processes on the local machine), and the planner
//! (`rigger-plan`) compares them with what a provider observed. Start reading at [`desired`];
//! the vocabulary is in [`resource`].

pub mod resource;

pub use resource::{Attribute, OnChange, Resource, ResourceId, ResourceKind, Value, tag};
use rigger_config::{
    Cidr, Config, Environment, KeyPair, LaunchKind, LoadBalancerKind, ProviderConfig,
};

/// Ports of the architecture, as the seed describes them.
pub mod port {
    pub const SSH: u16 = 22;
    pub const HTTP: u16 = 80;
    pub const HTTPS: u16 = 443;
    /// Redis over TLS: its plain port is closed (`rigger_recipes::Ports::redis_tls`).
    pub const REDIS_TLS: u16 = 6380;
    /// AMQP over TLS: its plain port is closed (`rigger_recipes::Ports::amqps`).
    pub const AMQPS: u16 = 5671;
    pub const POSTGRES: u16 = 5432;
}

/// The web servers' health check on the load balancer (`HTTPS:443<health_check_path>`): its
/// timing. A server that is ready comes into service within two checks (12 s), and one that
/// stops answering leaves within two: with 3 checks of 15 s a booted server waited 45 s for
/// traffic, most of `up`'s time after the boots (bench/lab). A rolling deploy's gate asks for
/// stable checks on top. The timeout stays below the interval, as both kinds of load balancer
/// require.
pub mod health_check {
    pub const INTERVAL_SECONDS: i32 = 6;
    pub const TIMEOUT_SECONDS: i32 = 5;
    pub const HEALTHY_THRESHOLD: i32 = 2;
    pub const UNHEALTHY_THRESHOLD: i32 = 2;

    /// A health check's timing as plans show and compare it (`health_check_timing`).
    pub fn timing(interval: i32, timeout: i32, healthy: i32, unhealthy: i32) -> String {
        format!(
            "every {interval} s, timeout {timeout} s, healthy after {healthy}, unhealthy after {unhealthy}"
        )
    }

    /// The timing rigger wants.
    pub fn wanted_timing() -> String {
        timing(
            INTERVAL_SECONDS,
            TIMEOUT_SECONDS,
            HEALTHY_THRESHOLD,
            UNHEALTHY_THRESHOLD,
        )
    }
}

/// The SSM parameters under `/<project>/<env>/` that servers read at boot on AWS, besides the
/// secrets (`rigger_recipes::Secrets::NAMES`): named once, for the instance profiles that allow
/// reading them and for the provider that writes them.
pub mod parameter {
    /// The environment CA's certificate: public, every server may read it.
    pub const CA_CERT: &str = "ca_cert";
    /// The environment CA's key: the operator's alone. No instance profile allows reading it.
    pub const CA_KEY: &str = "ca_key";
    /// The name of the environment's bucket (releases and backups).
    pub const BUCKET: &str = "deploy/bucket";
    /// `on` while the environment is in maintenance.
    pub const MAINTENANCE: &str = "maintenance";
    /// Under this, each stand-alone server's key and certificate, signed by rigger before the
    /// server is started: `tls/<server id>/key` and `tls/<server id>/cert`.
    pub const TLS: &str = "tls/";

    /// Where stand-alone server `server`'s key and certificate are: `tls/<server>/`.
    pub fn tls(server: &str) -> String {
        format!("{TLS}{server}/")
    }

    /// The parameter of stand-alone server `server`'s private key.
    pub fn tls_key(server: &str) -> String {
        format!("{}key", tls(server))
    }

    /// The parameter of stand-alone server `server`'s certificate.
    pub fn tls_cert(server: &str) -> String {
        format!("{}cert", tls(server))
    }
}

/// Key prefixes in the environment's bucket.
pub mod bucket {
    /// Release tarballs, which web and worker servers fetch.
    pub const RELEASES: &str = "releases/";
    /// Database dumps, which only database servers read and write.
    pub const BACKUPS: &str = "backups/";
}

/// The TLS policies of the load balancer's HTTPS listener: TLS 1.2 and later with forward
/// secrecy only, the most modern each kind offers (classic load balancers have no TLS 1.3).
pub mod tls_policy {
    pub const CLASSIC: &str = "ELBSecurityPolicy-TLS-1-2-2017-01";
    pub const APPLICATION: &str = "ELBSecurityPolicy-TLS13-1-2-2021-06";
}

/// The roles of the architecture (the recipes' own: one enum for the project); a resource's
/// `role` tag is its role's name ([`Role::as_str`]), or [`EVERY_ROLE`] for what every server
/// shares.
pub use rigger_recipes::Role;

/// The `role` tag of resources every server shares (the common security group, the key pair).
pub const EVERY_ROLE: &str = "all";

/// The desired state of one environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub project: String,
    pub environment: String,
    pub release: String,
    /// Resources in an order where every resource comes after the ones it depends on.
    pub resources: Vec<Resource>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopologyError {
    #[error("no environment `{name}` in the configuration (it has: {})", known.join(", "))]
    UnknownEnvironment { name: String, known: Vec<String> },
}

/// Resource names of an environment, in one place so every provider spells them alike.
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
}

impl Names {
    pub fn new(project: &str, environment: &str) -> Self {
        Names {
            prefix: format!("{project}-{environment}"),
        }
    }

    /// `<project>-<env>-<role>-sg`; both database roles share `-db-sg`.
    pub fn security_group(&self, role: Role) -> String {
        match role {
            Role::DbPrimary | Role::DbReplica => format!("{}-db-sg", self.prefix),
            other => format!("{}-{}-sg", self.prefix, other.as_str()),
        }
    }

    /// `<project>-<env>-sg`: the group every server is in (SSH from the admin networks).
    pub fn common_security_group(&self) -> String {
        format!("{}-sg", self.prefix)
    }

    pub fn load_balancer(&self) -> String {
        format!("{}-lb", self.prefix)
    }

    pub fn launch_template(&self, role: Role, release: &str) -> String {
        format!("{}-{}-{release}", self.prefix, role.as_str())
    }

    /// A launch configuration as the topology names it; on AWS its name also carries the UTC
    /// time it was made: [`Names::launch_configuration_on_aws`].
    pub fn launch_configuration(&self, role: Role, release: &str) -> String {
        self.launch_template(role, release)
    }

    /// `<project>-<env>-<role>-<UTC timestamp>-<release>`, the timestamp as
    /// `YYYYMMDDTHHMMSSZ`: launch configurations cannot change, so each one made is new.
    pub fn launch_configuration_on_aws(
        &self,
        role: Role,
        timestamp: &str,
        release: &str,
    ) -> String {
        format!("{}-{}-{timestamp}-{release}", self.prefix, role.as_str())
    }

    /// Reads a name made by [`Names::launch_configuration_on_aws`] back into the topology's
    /// name; `None` for a name that is not one of this environment's.
    pub fn launch_configuration_from_aws(&self, aws_name: &str) -> Option<String> {
        let rest = aws_name.strip_prefix(&self.prefix)?.strip_prefix('-')?;
        for role in [Role::Web, Role::Worker] {
            let Some(after) = rest
                .strip_prefix(role.as_str())
                .and_then(|r| r.strip_prefix('-'))
            else {
                continue;
            };
            let (timestamp, release) = (after.get(..16)?, after.get(16..)?);
            let release = release.strip_prefix('-').filter(|r| !r.is_empty())?;
            if is_timestamp(timestamp) {
                return Some(self.launch_configuration(role, release));
            }
        }
        None
    }

    /// The key pair rigger imports from `admin_public_key`: `<project>-<env>`.
    pub fn key_pair(&self) -> String {
        self.prefix.clone()
    }

    /// The instance profile (and its IAM role) rigger creates for the servers of `role`:
    /// `<project>-<env>-<role>-instance`; both database roles share `-db-instance`, as a
    /// failover makes a replica the primary in place.
    pub fn instance_profile(&self, role: Role) -> String {
        match role {
            Role::DbPrimary | Role::DbReplica => format!("{}-db-instance", self.prefix),
            other => format!("{}-{}-instance", self.prefix, other.as_str()),
        }
    }

    /// The one profile all servers shared before each role had its own,
    /// `<project>-<env>-instance`: providers observe it so that `up` deletes it.
    pub fn shared_instance_profile(&self) -> String {
        format!("{}-instance", self.prefix)
    }

    /// Every instance profile name rigger may have made for the environment.
    pub fn instance_profiles(&self) -> Vec<String> {
        let mut names: Vec<String> = PROFILE_ROLES
            .iter()
            .map(|role| self.instance_profile(*role))
            .collect();
        names.push(self.shared_instance_profile());
        names
    }

    pub fn group(&self, role: Role) -> String {
        format!("{}-{}", self.prefix, role.as_str())
    }

    /// The server in slot `slot` (1-based) of a group.
    pub fn group_server(&self, role: Role, slot: u32) -> String {
        format!("{}-{}[{slot}]", self.prefix, role.as_str())
    }

    /// A stand-alone server: `cache`, `queue`, `db-primary`, `db-replica1`, ...
    pub fn server(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.prefix)
    }

    pub fn volume(&self, server: &str) -> String {
        format!("{server}-data")
    }
}

/// The roles with an instance profile of their own (the database's is shared by its roles).
const PROFILE_ROLES: [Role; 5] = [
    Role::Web,
    Role::Worker,
    Role::Cache,
    Role::Queue,
    Role::DbPrimary,
];

/// `YYYYMMDDTHHMMSSZ`
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 16
        && b[8] == b'T'
        && b[15] == b'Z'
        && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit)
}

/// Desired counts of the groups as scaling left them (the live group's, or `rigger scale`'s);
/// `None` where the group does not exist yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScaledCounts {
    pub web: Option<u32>,
    pub worker: Option<u32>,
}

/// The desired resources of environment `environment` at release `release`, as for its first
/// creation: the groups at rigger.toml's `desired`.
pub fn desired(
    config: &Config,
    environment: &str,
    release: &str,
) -> Result<Topology, TopologyError> {
    desired_scaled(config, environment, release, ScaledCounts::default())
}

/// [`desired`], with each existing group's count left to scaling: the count in `scaled`,
/// brought within the group's `min..=max`, replaces rigger.toml's `desired` (which is only
/// the count a group starts with). So a plan changes a group's count only when a changed
/// `min` or `max` excludes it, and never fights the scaling policy or `rigger scale`.
pub fn desired_scaled(
    config: &Config,
    environment: &str,
    release: &str,
    scaled: ScaledCounts,
) -> Result<Topology, TopologyError> {
    let env =
        config
            .environments
            .get(environment)
            .ok_or_else(|| TopologyError::UnknownEnvironment {
                name: environment.to_owned(),
                known: config.environments.keys().cloned().collect(),
            })?;
    let mut env = env.clone();
    for (sizing, count) in [(&mut env.web, scaled.web), (&mut env.worker, scaled.worker)] {
        if let Some(count) = count {
            sizing.desired = count.clamp(sizing.min, sizing.max);
        }
    }
    let mut builder = Builder {
        names: Names::new(&config.project.name, environment),
        project: &config.project.name,
        env: &env,
        release,
        health_check_path: &config.project.health_check_path,
        resources: Vec::new(),
    };
    builder.security_groups();
    builder.key_pair();
    builder.instance_profiles();
    builder.load_balancer();
    builder.groups();
    builder.stand_alone_servers();
    Ok(Topology {
        project: config.project.name.clone(),
        environment: environment.to_owned(),
        release: release.to_owned(),
        resources: builder.resources,
    })
}

struct Builder<'a> {
    names: Names,
    project: &'a str,
    env: &'a Environment,
    release: &'a str,
    health_check_path: &'a str,
    resources: Vec<Resource>,
}

impl Builder<'_> {
    fn push(&mut self, role: Role, resource: Resource) -> ResourceId {
        self.push_tagged(role.as_str(), resource)
    }

    /// Adds `resource` with `role_tag` as its `role` tag.
    fn push_tagged(&mut self, role_tag: &str, resource: Resource) -> ResourceId {
        let resource = resource
            .tag(tag::PROJECT, self.project)
            .tag(tag::ENVIRONMENT, &self.env.name)
            .tag(tag::ROLE, role_tag)
            .tag(tag::RELEASE, self.release);
        let id = resource.id.clone();
        self.resources.push(resource);
        id
    }

    fn sg_id(&self, role: Role) -> ResourceId {
        ResourceId::new(ResourceKind::SecurityGroup, self.names.security_group(role))
    }

    fn common_sg_id(&self) -> ResourceId {
        ResourceId::new(
            ResourceKind::SecurityGroup,
            self.names.common_security_group(),
        )
    }

    fn is_local(&self) -> bool {
        matches!(self.env.provider, ProviderConfig::Local(_))
    }

    /// One group per role. Ingress rules name their sources by group, never by address, and
    /// nothing but the load balancer's 80/443 is open to the world.
    fn security_groups(&mut self) {
        let admin_cidrs: &[Cidr] = match &self.env.provider {
            ProviderConfig::Aws(aws) => &aws.admin_cidrs,
            ProviderConfig::Local(_) => &[],
        };
        let ssh = admin_cidrs
            .iter()
            .map(|cidr| rule(port::SSH, &cidr.to_string()));
        let common = Resource::new(
            ResourceKind::SecurityGroup,
            self.names.common_security_group(),
        )
        .set_immutable("description", "rigger: every server")
        .set("ingress", Value::Set(ssh.collect()));
        self.push_tagged(EVERY_ROLE, common);

        let anywhere = Cidr::ANYWHERE.to_string();
        let lb_rules = vec![rule(port::HTTP, &anywhere), rule(port::HTTPS, &anywhere)];
        self.security_group(Role::Lb, "the load balancer", lb_rules, &[]);

        let lb = self.names.security_group(Role::Lb);
        let web_rules = vec![rule(port::HTTP, &sg(&lb)), rule(port::HTTPS, &sg(&lb))];
        self.security_group(Role::Web, "web servers", web_rules, &[Role::Lb]);
        self.security_group(Role::Worker, "worker servers", Vec::new(), &[]);

        let web = self.names.security_group(Role::Web);
        let worker = self.names.security_group(Role::Worker);
        let app_clients = [Role::Web, Role::Worker];
        let cache_rules = vec![
            rule(port::REDIS_TLS, &sg(&web)),
            rule(port::REDIS_TLS, &sg(&worker)),
        ];
        self.security_group(Role::Cache, "Redis", cache_rules, &app_clients);
        let queue_rules = vec![
            rule(port::AMQPS, &sg(&web)),
            rule(port::AMQPS, &sg(&worker)),
        ];
        self.security_group(Role::Queue, "RabbitMQ", queue_rules, &app_clients);

        let db = self.names.security_group(Role::DbPrimary);
        let db_rules = vec![
            rule(port::POSTGRES, &sg(&web)),
            rule(port::POSTGRES, &sg(&worker)),
            rule(port::POSTGRES, &sg(&db)),
        ];
        self.security_group(Role::DbPrimary, "PostgreSQL", db_rules, &app_clients);
    }

    fn security_group(&mut self, role: Role, purpose: &str, rules: Vec<String>, sources: &[Role]) {
        let name = self.names.security_group(role);
        let mut resource = Resource::new(ResourceKind::SecurityGroup, name)
            .set_immutable("description", format!("rigger: {purpose}"))
            .set("ingress", Value::Set(rules.into_iter().collect()));
        for source in sources {
            resource = resource.depends_on(&self.sg_id(*source));
        }
        self.push(role, resource);
    }

    fn load_balancer(&mut self) {
        let (kind, http, https, certificate) = match &self.env.provider {
            ProviderConfig::Local(local) => (
                "haproxy".to_owned(),
                local.http_port,
                local.https_port,
                None,
            ),
            ProviderConfig::Aws(aws) => (
                aws.load_balancer.to_string(),
                port::HTTP,
                port::HTTPS,
                aws.certificate.clone(),
            ),
        };
        let listeners = vec![
            Value::from(format!("{http}->{} HTTP", port::HTTP)),
            Value::from(format!("{https}->{} HTTPS", port::HTTPS)),
        ];
        let mut lb = Resource::new(ResourceKind::LoadBalancer, self.names.load_balancer())
            .set_immutable("kind", kind)
            .set("listeners", Value::List(listeners))
            .set(
                "health_check",
                format!("HTTPS:{}{}", port::HTTPS, self.health_check_path),
            )
            .set("health_check_timing", health_check::wanted_timing())
            .set(
                "security_groups",
                sg_set(&[self.names.security_group(Role::Lb)]),
            )
            .depends_on(&self.sg_id(Role::Lb));
        if let Some(certificate) = certificate {
            lb = lb.set("certificate", certificate);
        }
        if let ProviderConfig::Aws(aws) = &self.env.provider {
            let tls_policy = match aws.load_balancer {
                LoadBalancerKind::Classic => tls_policy::CLASSIC,
                LoadBalancerKind::Application => tls_policy::APPLICATION,
            };
            lb = lb
                .set("cross_zone", true)
                .set("connection_draining_seconds", 30u32)
                .set("tls_policy", tls_policy);
        }
        self.push(Role::Lb, lb);
    }

    /// The key pair rigger imports from `admin_public_key` (AWS only).
    fn key_pair(&mut self) {
        let ProviderConfig::Aws(aws) = &self.env.provider else {
            return;
        };
        if let Some(KeyPair::Import(public_key)) = &aws.key_pair {
            let key = Resource::new(ResourceKind::KeyPair, self.names.key_pair())
                .set_immutable("public_key", public_key.clone());
            self.push_tagged(EVERY_ROLE, key);
        }
    }

    /// An IAM role and instance profile per server role, unless rigger.toml names a profile
    /// for every server (AWS only). Each allows exactly what its servers read at boot or use
    /// later, and nothing another role needs: see [`Builder::permissions`].
    fn instance_profiles(&mut self) {
        let ProviderConfig::Aws(aws) = &self.env.provider else {
            return;
        };
        if aws.instance_profile.is_some() {
            return;
        }
        for role in PROFILE_ROLES {
            if role == Role::Queue && self.env.cache.shared_with_queue {
                continue;
            }
            let name = self.names.instance_profile(role);
            let profile = Resource::new(ResourceKind::InstanceProfile, name.clone())
                .set_immutable("role", name)
                .set("permissions", Value::Set(self.permissions(role)));
            self.push(role, profile);
        }
    }

    /// What the servers of `role` may do, one line per grant (`ACTION /ssm/path`,
    /// `ACTION s3:::bucket/key`, `kms:Decrypt via ssm`): read exactly the secrets their
    /// recipes use (`rigger_recipes::Role::secrets`) and the CA's certificate, decrypting
    /// them only through SSM; web servers the maintenance record, web and worker servers the
    /// bucket's name and its releases; a stand-alone server its key and certificate, which
    /// rigger signed; database servers read and write backups. No role may read the CA's key,
    /// another role's secrets, or another prefix of the bucket.
    fn permissions(&self, role: Role) -> std::collections::BTreeSet<String> {
        let read = |name: &str| {
            format!(
                "ssm:GetParameter /{}/{}/{name}",
                self.project, self.env.name
            )
        };
        // The bucket's name ends in a random suffix (see rigger-aws `releases`).
        let bucket = format!("{}-{}-releases-*", self.project, self.env.name).to_ascii_lowercase();
        let objects = |action: &str, prefix: &str| format!("{action} s3:::{bucket}/{prefix}*");
        let (recipes, grants): (&[Role], Vec<String>) = match role {
            Role::Web => (
                &[Role::Web],
                vec![
                    read(parameter::MAINTENANCE),
                    read(parameter::BUCKET),
                    objects("s3:GetObject", bucket::RELEASES),
                ],
            ),
            Role::Worker => (
                &[Role::Worker],
                vec![
                    read(parameter::BUCKET),
                    objects("s3:GetObject", bucket::RELEASES),
                ],
            ),
            Role::Cache if self.env.cache.shared_with_queue => (
                &[Role::Cache, Role::Queue],
                vec![read(&format!("{}*", parameter::tls("cache")))],
            ),
            Role::Cache => (
                &[Role::Cache],
                vec![read(&format!("{}*", parameter::tls("cache")))],
            ),
            Role::Queue => (
                &[Role::Queue],
                vec![read(&format!("{}*", parameter::tls("queue")))],
            ),
            Role::DbPrimary | Role::DbReplica => (
                &[Role::DbPrimary, Role::DbReplica],
                vec![
                    // Every database server's id starts with `db-` (a failover's new
                    // replicas too), and any of them may become the primary.
                    read(&format!("{}db-*", parameter::TLS)),
                    objects("s3:GetObject", bucket::BACKUPS),
                    objects("s3:PutObject", bucket::BACKUPS),
                ],
            ),
            Role::Lb => (&[], Vec::new()),
        };
        let mut lines: std::collections::BTreeSet<String> = recipes
            .iter()
            .flat_map(|recipe| recipe.secrets())
            .map(|secret| read(secret))
            .collect();
        lines.extend(grants);
        lines.insert(read(parameter::CA_CERT));
        lines.insert("kms:Decrypt via ssm".to_owned());
        // Separate grants (rigger-aws `hostkeys`): every server publishes its own SSH host
        // keys and how its boot went, each in the one parameter named by its instance id (a
        // policy variable of EC2 role sessions), so that rigger pins the keys and waits for
        // the boot; no server can publish for another.
        for published in ["hostkeys", "boot"] {
            lines.insert(format!(
                "ssm:PutParameter /{}/{}/{published}/${{ec2:InstanceID}}",
                self.project, self.env.name
            ));
        }
        lines
    }

    /// What every server of `role` is started with on AWS: the key pair and its role's
    /// instance profile, with the dependencies on them when rigger makes them.
    /// `replace_on_key_change`: a running instance's key cannot change.
    fn with_access(
        &self,
        mut resource: Resource,
        role: Role,
        replace_on_key_change: bool,
    ) -> Resource {
        let ProviderConfig::Aws(aws) = &self.env.provider else {
            return resource;
        };
        let key = match &aws.key_pair {
            Some(KeyPair::Existing(name)) => Some(name.clone()),
            Some(KeyPair::Import(_)) => {
                let name = self.names.key_pair();
                resource =
                    resource.depends_on(&ResourceId::new(ResourceKind::KeyPair, name.clone()));
                Some(name)
            }
            None => None,
        };
        if let Some(key) = key {
            resource = if replace_on_key_change {
                resource.set_immutable("key_pair", key)
            } else {
                resource.set("key_pair", key)
            };
        }
        let profile = match &aws.instance_profile {
            Some(name) => name.clone(),
            None => {
                let name = self.names.instance_profile(role);
                resource = resource.depends_on(&ResourceId::new(
                    ResourceKind::InstanceProfile,
                    name.clone(),
                ));
                name
            }
        };
        resource.set("instance_profile", profile)
    }

    fn launch_kind(&self) -> LaunchKind {
        match &self.env.provider {
            ProviderConfig::Aws(aws) => aws.launch,
            ProviderConfig::Local(_) => LaunchKind::Template,
        }
    }

    /// Web and worker: a launch template (or configuration) for this release and a group
    /// pointing at it, plus one resource per server the group should run.
    fn groups(&mut self) {
        let lb = ResourceId::new(ResourceKind::LoadBalancer, self.names.load_balancer());
        let cpu_target = match &self.env.provider {
            ProviderConfig::Aws(aws) => Some(aws.cpu_target),
            ProviderConfig::Local(_) => None,
        };
        for (role, sizing) in [(Role::Web, &self.env.web), (Role::Worker, &self.env.worker)] {
            let security_groups = sg_set(&[
                self.names.common_security_group(),
                self.names.security_group(role),
            ]);
            let (kind, attribute, template_name) = match self.launch_kind() {
                LaunchKind::Template => (
                    ResourceKind::LaunchTemplate,
                    "launch_template",
                    self.names.launch_template(role, self.release),
                ),
                LaunchKind::Configuration => (
                    ResourceKind::LaunchConfiguration,
                    "launch_configuration",
                    self.names.launch_configuration(role, self.release),
                ),
            };
            let mut template = Resource::new(kind, template_name.clone())
                .set_immutable("release", self.release)
                .set_immutable("security_groups", security_groups)
                .set_immutable("volume_size_gib", sizing.volume_size)
                .depends_on(&self.common_sg_id())
                .depends_on(&self.sg_id(role));
            template = self.with_machine(template, &sizing.instance_type);
            template = self.with_access(template, role, false);
            if kind == ResourceKind::LaunchConfiguration {
                // A launch configuration cannot be changed: every difference makes a new one.
                for attribute in template.attributes.values_mut() {
                    attribute.on_change = OnChange::Replace;
                }
            }
            let template_id = self.push(role, template);

            let mut group = Resource::new(ResourceKind::AutoScalingGroup, self.names.group(role))
                .set("min", sizing.min)
                .set("max", sizing.max)
                .set("desired", sizing.desired)
                .set(attribute, template_name.clone())
                .depends_on(&template_id);
            if let Some(target) = cpu_target {
                group = group.set("cpu_target", target);
            }
            if role == Role::Web {
                group = group
                    .set("load_balancer", self.names.load_balancer())
                    .set("health_check_type", "ELB")
                    .depends_on(&lb);
            }
            let group_id = self.push(role, group);

            for slot in 1..=sizing.desired {
                let server = Resource::new(
                    ResourceKind::GroupServer,
                    self.names.group_server(role, slot),
                )
                .set_immutable(attribute, template_name.clone())
                .depends_on(&group_id);
                self.push(role, server);
            }
        }
    }

    fn stand_alone_servers(&mut self) {
        let cache = &self.env.cache;
        if cache.shared_with_queue {
            let sgs = [Role::Cache, Role::Queue];
            self.server(
                "cache",
                Role::Cache,
                &["cache", "queue"],
                &sgs,
                &cache.instance_type,
                cache.volume_size,
                None,
            );
        } else {
            self.server(
                "cache",
                Role::Cache,
                &["cache"],
                &[Role::Cache],
                &cache.instance_type,
                cache.volume_size,
                None,
            );
            self.server(
                "queue",
                Role::Queue,
                &["queue"],
                &[Role::Queue],
                &cache.instance_type,
                cache.volume_size,
                None,
            );
        }
        let db = &self.env.database;
        let primary = self.server(
            "db-primary",
            Role::DbPrimary,
            &["db-primary"],
            &[Role::DbPrimary],
            &db.instance_type,
            db.volume_size,
            None,
        );
        for n in 1..=db.replicas {
            let suffix = format!("db-replica{n}");
            self.server(
                &suffix,
                Role::DbReplica,
                &["db-replica"],
                &[Role::DbReplica],
                &db.instance_type,
                db.volume_size,
                Some(&primary),
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn server(
        &mut self,
        suffix: &str,
        role: Role,
        roles: &[&str],
        groups: &[Role],
        instance_type: &str,
        volume_size: u32,
        after: Option<&ResourceId>,
    ) -> ResourceId {
        let name = self.names.server(suffix);
        let mut volume = Resource::new(ResourceKind::Volume, self.names.volume(&name))
            .set("size_gib", volume_size);
        if !self.is_local() {
            volume = volume
                .set_immutable("encrypted", true)
                .set("volume_type", "gp3");
        }
        let volume_id = self.push(role, volume);

        let mut security_groups = vec![self.names.common_security_group()];
        security_groups.extend(groups.iter().map(|role| self.names.security_group(*role)));
        let mut server = Resource::new(ResourceKind::Server, name)
            .set_immutable(
                "roles",
                Value::Set(roles.iter().map(|r| (*r).to_owned()).collect()),
            )
            .set("security_groups", sg_set(&security_groups))
            .set("data_volume", self.names.volume(&self.names.server(suffix)))
            .depends_on(&volume_id)
            .depends_on(&self.common_sg_id());
        for role in groups {
            server = server.depends_on(&self.sg_id(*role));
        }
        if let Some(primary) = after {
            server = server.depends_on(primary);
        }
        server = self.with_machine(server, instance_type);
        server = self.with_access(server, role, true);
        self.push(role, server)
    }

    /// Machine image and instance type mean something only on AWS; the local provider runs
    /// every server on this machine, so its plan leaves them out rather than show fiction.
    fn with_machine(&self, resource: Resource, instance_type: &str) -> Resource {
        match &self.env.provider {
            ProviderConfig::Aws(aws) => resource
                .set_immutable("image", aws.ami.clone())
                .set("instance_type", instance_type),
            ProviderConfig::Local(_) => resource,
        }
    }
}

fn rule(port: u16, source: &str) -> String {
    format!("tcp/{port} from {source}")
}

fn sg(name: &str) -> String {
    format!("sg:{name}")
}

fn sg_set(names: &[String]) -> Value {
    Value::Set(names.iter().cloned().collect())
}

#[cfg(test)]
mod tests;
