//! The AWS provider: the seed's architecture made real through the official AWS SDK for Rust,
//! reconciled by tags.
//!
//! [`Provider`] is the entry point: [`Provider::plan`] observes everything tagged with the
//! environment's `project` and `environment` ([`live`]) and hands it to the planner with the
//! desired topology ([`Provider::desired`]: the groups' counts are scaling's once they
//! exist); [`Provider::up`] stores missing secrets in SSM ([`secrets`]), checks the machine
//! image, and applies the plan wave by wave ([`apply`]); [`Provider::down`] applies the plan
//! against an empty topology, so the same code deletes in reverse dependency order;
//! [`Provider::status`] reports in the local provider's `rigger.status` schema ([`status`]);
//! [`Provider::servers`] lists the running servers and their addresses for `rigger exec`,
//! `logs`, `manage` and `ssh` ([`servers`]).
//! [`Provider::start_deploy`] and [`Provider::finish_deploy`] deploy a release: the history in
//! SSM, the release and the deploy lock in the environment's S3 bucket ([`releases`],
//! [`lock`]), a health-gated rolling replacement driven by rigger ([`deploy`]).
//! Servers boot with user-data rendered from the role recipes ([`userdata`]) and read their
//! secrets with their role's instance profile ([`iam`]), which allows exactly those.
//!
//! Architecture invariant: this is the only crate that depends on the AWS SDK. Everything it
//! decides comes from the pure crates (topology, plan, recipes); it only talks to AWS.
//! Emulator (moto) quirks are handled where the call is made, and documented there.
//!
//! Start reading at [`Provider`], then [`live::Live::observed`] and [`apply::apply`].

pub mod apply;
pub mod boot;
pub mod client;
pub mod context;
pub mod database;
pub mod deploy;
pub mod environment;
pub mod error;
pub mod hostkeys;
pub mod iam;
pub mod image;
pub mod lab;
pub mod live;
pub mod live_loadbalancer;
pub mod loadbalancer;
pub mod lock;
pub mod maintenance;
pub mod parameters;
pub mod placement;
pub mod policy;
pub mod releases;
pub mod secrets;
pub mod servers;
pub mod status;
pub mod tags;
pub mod userdata;

use rigger_config::Config;
use rigger_engine::progress::Progress;
use rigger_plan::{Action, Plan};
use rigger_topology::{ResourceKind, ScaledCounts, Topology, TopologyError};

pub use client::{Clients, Connection};
pub use context::Waits;
pub use environment::{AwsEnvironment, Network};
pub use error::{AwsError, ErrorKind};
pub use live::Live;
pub use servers::LiveServer;

/// One AWS environment, connected.
#[derive(Debug, Clone)]
pub struct Provider {
    pub env: AwsEnvironment,
    pub clients: Clients,
    pub waits: Waits,
    /// How often a held deploy lock is renewed ([`deploy::LOCK_RENEWAL`]; tests shorten it).
    pub lock_renewal: std::time::Duration,
}

/// What `up` did.
#[derive(Debug, Clone)]
pub struct UpOutcome {
    /// The plan that was applied (empty when there was nothing to do).
    pub plan: Plan,
    /// The topology the plan was made for.
    pub topology: Topology,
    /// Names of the secrets created in SSM (never their values).
    pub secrets_created: Vec<String>,
}

impl Provider {
    /// `None` when `environment` is not an AWS environment of `config`.
    pub async fn connect(
        config: Config,
        environment: &str,
        connection: &Connection,
    ) -> Option<Provider> {
        let env = AwsEnvironment::new(config, environment)?;
        let connection = Connection {
            region: env.aws().region.clone(),
            ..connection.clone()
        };
        Some(Provider {
            clients: Clients::connect(&connection).await,
            env,
            waits: Waits::default(),
            lock_renewal: deploy::LOCK_RENEWAL,
        })
    }

    /// The environment's network and everything tagged as its own.
    pub async fn observe(&self) -> Result<(Network, Live), AwsError> {
        let network = live::network(&self.env, &self.clients).await?;
        let live = Live::read(&self.env, &self.clients).await?;
        Ok((network, live))
    }

    /// The environment's desired topology at `release`, given what exists: an existing
    /// group's count is the one scaling left it at (within `min..=max`), not rigger.toml's
    /// `desired`, so `up` never undoes what the scaling policy did.
    pub fn desired(&self, live: &Live, release: &str) -> Result<Topology, TopologyError> {
        let count = |role| {
            live.groups
                .get(&self.env.names.group(role))
                .map(|g| u32::try_from(g.desired).unwrap_or(0))
        };
        let scaled = ScaledCounts {
            web: count(rigger_topology::Role::Web),
            worker: count(rigger_topology::Role::Worker),
        };
        let mut topology =
            rigger_topology::desired_scaled(&self.env.config, &self.env.name, release, scaled)?;
        image::use_image(&mut topology, &self.image(live), &live.observed(&self.env));
        Ok(topology)
    }

    /// The image the environment's servers launch from: the one `rigger image build` baked
    /// from rigger.toml's `ami`, else `ami` itself ([`image::choose`]).
    pub fn image(&self, live: &Live) -> image::ImageChoice {
        image::choose(&self.env.aws().ami, live.image.as_ref())
    }

    /// The release the environment's groups run (their launch template's or configuration's
    /// release), once they exist: a deploy changes it, `up` keeps it.
    pub fn current_release(&self, live: &Live) -> Option<String> {
        let group = live
            .groups
            .get(&self.env.names.group(rigger_topology::Role::Web))?;
        self.release_launched_by(
            group.launch_template.as_deref(),
            group.launch_configuration.as_deref(),
        )
    }

    /// The release of the web group's launch template or launch configuration, by name.
    pub(crate) fn release_launched_by(
        &self,
        launch_template: Option<&str>,
        launch_configuration: Option<&str>,
    ) -> Option<String> {
        let prefix = self
            .env
            .names
            .launch_template(rigger_topology::Role::Web, "");
        if let Some(template) = launch_template {
            return template.strip_prefix(&prefix).map(str::to_owned);
        }
        // `<prefix><UTC timestamp>-<release>`.
        launch_configuration?
            .strip_prefix(&prefix)
            .and_then(|rest| rest.get(17..))
            .map(str::to_owned)
    }

    /// The diff between the live environment and its topology at `release` (for a first
    /// creation; existing groups keep the release they run).
    pub async fn plan(&self, release: &str) -> Result<Plan, AwsError> {
        let (_, live) = self.observe().await?;
        let release = self
            .current_release(&live)
            .unwrap_or_else(|| release.to_owned());
        let topology = self.desired(&live, &release).map_err(topology_error)?;
        Ok(rigger_plan::plan(&live.observed(&self.env), &topology))
    }

    /// Makes the environment match its topology at `release` (for a first creation; existing
    /// groups keep the release they run, which only a deploy changes), with its releases
    /// bucket; a second run finds nothing to do.
    pub async fn up(&self, release: &str, report: &dyn Progress) -> Result<UpOutcome, AwsError> {
        let (network, live) = self.observe().await?;
        let release = self
            .current_release(&live)
            .unwrap_or_else(|| release.to_owned());
        let topology = self.desired(&live, &release).map_err(topology_error)?;
        self.check_no_failover_interrupted(&live).await?;
        let secrets_created = secrets::ensure(&self.env, &self.clients, &live.parameters).await?;
        releases::ensure(&self.env, &self.clients, report).await?;
        for name in &secrets_created {
            report.report(&format!("stored secret {name} in SSM"));
        }
        let plan = rigger_plan::plan(&live.observed(&self.env), &topology);
        if plan.is_empty() {
            return Ok(UpOutcome {
                plan,
                topology,
                secrets_created,
            });
        }
        let launches = plan.steps.iter().any(|s| {
            matches!(s.action, Action::Create | Action::Replace | Action::Update)
                && matches!(
                    s.id.kind,
                    ResourceKind::LaunchTemplate
                        | ResourceKind::LaunchConfiguration
                        | ResourceKind::Server
                )
        });
        if launches {
            self.check_image(&self.image(&live)).await?;
        }
        apply::apply(
            &self.env,
            &self.clients,
            &network,
            &live,
            &topology,
            &plan,
            self.waits,
            report,
        )
        .await?;
        self.prune_published(report).await?;
        Ok(UpOutcome {
            plan,
            topology,
            secrets_created,
        })
    }

    /// Deletes what servers that are gone published ([`hostkeys::prune`]).
    pub async fn prune_published(&self, report: &dyn Progress) -> Result<(), AwsError> {
        let pruned = hostkeys::prune(&self.env, &self.clients).await?;
        if !pruned.is_empty() {
            report.report(&format!(
                "deleted what {} servers that are gone published (host keys, boot reports: {})",
                pruned.len(),
                pruned.join(", ")
            ));
        }
        Ok(())
    }

    /// Deletes everything tagged as the environment's, in reverse dependency order, and its
    /// secrets. Returns the plan it applied.
    pub async fn down(&self, report: &dyn Progress) -> Result<Plan, AwsError> {
        let (network, mut live) = self.observe().await?;
        // A failover's fenced old primary goes too.
        live.fenced_included = true;
        let nothing = Topology {
            project: self.env.project().to_owned(),
            environment: self.env.name.clone(),
            release: String::new(),
            resources: Vec::new(),
        };
        let plan = rigger_plan::plan(&live.observed(&self.env), &nothing);
        apply::apply(
            &self.env,
            &self.clients,
            &network,
            &live,
            &nothing,
            &plan,
            self.waits,
            report,
        )
        .await?;
        // Interfaces left by an interrupted run (their servers are gone).
        let (_, after) = self.observe().await?;
        for interface in &after.interfaces {
            report.report(&format!("deleting network interface {}", interface.name));
            apply::delete_orphan_interface(&self.clients, interface, self.waits).await?;
        }
        if let Some(bucket) = releases::find(&self.env, &self.clients).await? {
            report.report(&format!("deleting bucket {bucket} and its releases"));
            releases::delete(&self.env, &self.clients, &bucket).await?;
        }
        let deploy_parameters = deploy::parameters(&self.env, &self.clients).await?;
        if !deploy_parameters.is_empty() {
            report.report("deleting the deploy history from SSM");
            secrets::delete(&self.clients, &deploy_parameters).await?;
        }
        if !live.parameters.is_empty() {
            report.report(&format!(
                "deleting {} secrets from SSM",
                live.parameters.len()
            ));
            secrets::delete(&self.clients, &live.parameters).await?;
        }
        let certificates = secrets::server_certificates(&self.env, &self.clients).await?;
        if !certificates.is_empty() {
            report.report("deleting the servers' keys and certificates from SSM");
            secrets::delete(&self.clients, &certificates).await?;
        }
        // Every server is gone: so is what they published (host keys, boot reports).
        let publishers: Vec<String> = hostkeys::publishers(&self.env, &self.clients)
            .await?
            .into_iter()
            .collect();
        if !publishers.is_empty() {
            report
                .report("deleting the servers' published SSH host keys and boot reports from SSM");
            hostkeys::forget(&self.env, &self.clients, &publishers).await?;
        }
        Ok(plan)
    }

    /// Servers, groups, load balancer health and URLs.
    pub async fn status(&self) -> Result<status::Status, AwsError> {
        let live = Live::read(&self.env, &self.clients).await?;
        let health = match live.load_balancer(self.env.aws().load_balancer) {
            Some(lb) => {
                loadbalancer::instance_health(&self.clients, lb, &self.env.names.load_balancer())
                    .await?
            }
            None => Default::default(),
        };
        let boots = self.boot_reports().await?;
        let mut status = status::status(&self.env, &live, &health, boots.as_ref());
        // What the groups launch now (the groups' tags keep the release of their creation).
        if let Some(release) = self.current_release(&live) {
            status.release = release;
        }
        status.maintenance = maintenance::is_on(&self.env, &self.clients).await?;
        // A sweep on the way: credentials that may only read leave the keys for `up`.
        if let Err(error) = hostkeys::prune(&self.env, &self.clients).await {
            tracing::warn!("not deleting what servers that are gone published: {error}");
        }
        Ok(status)
    }

    /// Sets the group's desired capacity, as `rigger_engine::scale` asks (which checks the
    /// bounds and the deploy lock first).
    pub async fn scale(&self, role: rigger_topology::Role, count: u32) -> Result<(), AwsError> {
        use error::Context as _;
        let group = self.env.names.group(role);
        self.clients
            .autoscaling
            .set_desired_capacity()
            .auto_scaling_group_name(&group)
            .desired_capacity(i32::try_from(count).unwrap_or(i32::MAX))
            .honor_cooldown(false)
            .send()
            .await
            .op("SetDesiredCapacity", &group)?;
        Ok(())
    }

    /// The running servers, with their roles, state, addresses ([`servers::servers`]) and the
    /// SSH host keys each published ([`hostkeys`]).
    pub async fn servers(&self) -> Result<Vec<LiveServer>, AwsError> {
        let live = Live::read(&self.env, &self.clients).await?;
        let mut published = hostkeys::published(&self.env, &self.clients).await?;
        let mut servers = servers::servers(&self.env, &live);
        for server in &mut servers {
            server.host_keys = published.remove(&server.instance_id);
        }
        Ok(servers)
    }

    /// Every server's boot report ([`boot`]), or `None` where none is awaited: servers that
    /// are not machines ([`Self::servers_are_machines`]) never boot.
    pub async fn boot_reports(
        &self,
    ) -> Result<Option<std::collections::BTreeMap<String, boot::BootReport>>, AwsError> {
        if !self.servers_are_machines().await? {
            return Ok(None);
        }
        Ok(Some(boot::reports(&self.env, &self.clients).await?))
    }

    /// Whether the environment's servers are machines rigger can reach over SSH, or only rows
    /// in an emulator's table. On AWS they are machines. Against an endpoint override they
    /// are machines when one of them ran its boot script far enough to publish its SSH host
    /// keys (the lab boots the emulator's instances for real); an emulator alone never runs a
    /// boot script, so nothing is published and the SSH steps are skipped. One rule for every
    /// command, decided from what the servers did rather than from where the API answers.
    pub async fn servers_are_machines(&self) -> Result<bool, AwsError> {
        if !self.clients.endpoint_override {
            return Ok(true);
        }
        Ok(!hostkeys::published(&self.env, &self.clients)
            .await?
            .is_empty())
    }

    /// Fails early, naming the image, when the AMI servers launch from does not exist in the
    /// region.
    async fn check_image(&self, choice: &image::ImageChoice) -> Result<(), AwsError> {
        let ami = &choice.ami;
        if !image::image_exists(&self.clients, ami).await? {
            return Err(AwsError::precondition(
                "DescribeImages",
                ami,
                format!("the image does not exist in {}", self.env.aws().region),
                match &choice.baked {
                    Some(_) => format!(
                        "the image `rigger image build` recorded was deregistered: run `rigger image build -e {}` again",
                        self.env.name
                    ),
                    None => ErrorKind::MissingImage.hint().to_owned(),
                },
            ));
        }
        Ok(())
    }
}

/// The environment was checked when the provider connected; a topology error here is a bug.
pub(crate) fn topology_error(error: TopologyError) -> AwsError {
    AwsError::precondition(
        "(topology)",
        "rigger.toml",
        error.to_string(),
        "this is a bug in rigger; please report it",
    )
}

/// The Auto Scaling groups as `rigger scale` drives them (`rigger_engine::scale`).
impl rigger_engine::scale::ScaleTarget for Provider {
    type Error = AwsError;

    /// A lock past its expiry is nobody's (the holder may be on any machine).
    async fn lock_holder(&mut self) -> Result<Option<rigger_plan::deploys::LockHolder>, AwsError> {
        Ok(deploy::lock_holder(&self.env, &self.clients)
            .await?
            .filter(|holder| holder.expires > rigger_engine::clock::unix_now()))
    }

    async fn set_desired(
        &mut self,
        group: rigger_topology::Role,
        count: u32,
    ) -> Result<(), AwsError> {
        self.scale(group, count).await
    }

    async fn status(&mut self) -> Result<status::Status, AwsError> {
        Provider::status(self).await
    }
}

/// The environment as `up` waits for it (`rigger_engine::ready`): never gone by itself (AWS
/// keeps working on it); a failed boot shows in the status.
impl rigger_engine::ready::ReadySource for &Provider {
    type Error = AwsError;

    async fn status(&mut self) -> Result<Option<status::Status>, AwsError> {
        Provider::status(self).await.map(Some)
    }

    async fn gone(&mut self) -> Option<String> {
        None
    }
}
