//! Deploys on AWS: the history and the rollout in progress in SSM Parameter Store, and the
//! rolling replacement rigger drives itself (the emulator has no instance refresh, and
//! instance refresh could not warm-stop Celery or quote a failing server).
//!
//! [`crate::Provider::start_deploy`] (or [`crate::Provider::start_rollback`], for a release
//! already in the bucket) takes the deploy lock ([`crate::lock`]: an object in the
//! environment's bucket changed only by conditional requests; a stale one is taken over and
//! the interrupted deploy recorded), which a [`LockKeeper`] renews from then on until the
//! deploy ends, and uploads the release to the environment's bucket ([`crate::releases`]); the
//! caller then runs the migrations (over SSH, outside this crate) and
//! [`crate::Provider::finish_deploy`] rolls out: first it undoes what an interrupted rollout
//! left ([`RolloutRecord`]), then makes a launch template (or configuration) for the release,
//! then runs the engine's rollout ([`rigger_engine::rollout::roll_out`]: the order, the health
//! gate, the rollback) with the groups as its [`RolloutTarget`]: a group begins by pointing at
//! the release's template, a batch is launched by raising the desired count, observed through
//! [`HealthSource`] (the load balancer's instance health for web servers, the group's for
//! workers) and the servers' boot reports, and old servers retire by being detached, drained
//! (deregistered) or warm-stopped ([`ServerOps`]), and terminated. The servers' evidence for a
//! failed batch comes from [`ServerOps::diagnose`]. Every deploy ends as a record under
//! `/<project>/<env>/deploy/history/`.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::future::BoxFuture;
pub use rigger_engine::rollout::RolloutSettings;
use rigger_engine::rollout::{Launched, Observation, RolloutOutcome, RolloutTarget};
use rigger_plan::{Action, Plan};
use rigger_topology::{ResourceKind, Role};
use serde::{Deserialize, Serialize};

use crate::Clients;
use crate::environment::AwsEnvironment;
use crate::error::{AwsError, Context as _};
use rigger_engine::progress::Progress;

pub use crate::lock::{
    Acquired, HeldLock, LOCK_RENEWAL, LOCK_TTL, LockHolder, LockKeeper, Requester, acquire_lock,
    lock_holder, release_lock, release_lock_by_id, renew_lock,
};
pub use crate::releases::Artifact;
pub use rigger_plan::deploys::DeployRecord;

/// A deploy that holds the lock and whose release is in the bucket.
#[derive(Debug)]
pub struct StartedDeploy {
    pub release: String,
    pub revision: String,
    pub bucket: String,
    /// The lock this deploy holds, renewed from the moment it was taken until the deploy
    /// ends: who deploys, since when.
    pub lock: LockKeeper,
}

fn history_path(env: &AwsEnvironment) -> String {
    env.parameter("deploy/history")
}

/// Appends `record` to the history.
pub async fn record(
    env: &AwsEnvironment,
    clients: &Clients,
    record: &DeployRecord,
) -> Result<(), AwsError> {
    let name = format!(
        "{}/{:012}-{}",
        history_path(env),
        record.started,
        record.release
    );
    let value = serde_json::to_string(record).expect("serializable");
    crate::parameters::put(clients, &name, &value).await
}

/// The deploy history, oldest first.
pub async fn history(
    env: &AwsEnvironment,
    clients: &Clients,
) -> Result<Vec<DeployRecord>, AwsError> {
    let mut records: Vec<(String, DeployRecord)> =
        crate::parameters::under(clients, &history_path(env), true)
            .await?
            .into_iter()
            .filter_map(|(name, value)| Some((name, serde_json::from_str(&value).ok()?)))
            .collect();
    records.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(records.into_iter().map(|(_, r)| r).collect())
}

/// Every parameter under `/<project>/<env>/deploy/` (the lock, the history, the bucket's
/// name), for `down`.
pub async fn parameters(env: &AwsEnvironment, clients: &Clients) -> Result<Vec<String>, AwsError> {
    crate::parameters::names_under(clients, &env.parameter("deploy")).await
}

/// Where the health gate's observations come from: the load balancer, or a fake in tests.
pub trait HealthSource: Send + Sync {
    /// Each server's state in the gate's terms (`UP`, or the load balancer's state and
    /// reason), keyed by instance id.
    fn states<'a>(
        &'a self,
        servers: &'a [String],
    ) -> BoxFuture<'a, Result<BTreeMap<String, String>, AwsError>>;
}

/// Where the boot reports of new servers are read ([`crate::boot`]) when they must report
/// before they count as healthy: servers that are machines.
pub struct BootReports<'a> {
    pub env: &'a AwsEnvironment,
    pub clients: &'a Clients,
}

impl BootReports<'_> {
    /// Overlays the boot reports on the health source's `states`: a server that has not
    /// reported yet is `booting` whatever else is said of it; one whose boot failed is
    /// returned with why, to fail the batch at once.
    async fn overlay(
        &self,
        servers: &[String],
        states: &mut BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, AwsError> {
        let reports = crate::boot::reports(self.env, self.clients).await?;
        let mut failed = BTreeMap::new();
        for server in servers {
            match reports.get(server) {
                Some(crate::boot::BootReport::Finished) => {}
                Some(crate::boot::BootReport::Failed(why)) => {
                    failed.insert(server.clone(), format!("its boot failed: {why}"));
                }
                None => {
                    let said = states
                        .get(server)
                        .map_or_else(String::new, |state| format!(", {state}"));
                    states.insert(server.clone(), format!("booting{said}"));
                }
            }
        }
        Ok(failed)
    }
}

/// Waits with the engine's gate until every server in `servers` is healthy (and has reported a
/// finished boot, where `boots` says they must): `Err` with the reason (each unhealthy server
/// and the last state seen, or the failed boot) otherwise.
pub async fn wait_healthy(
    source: &dyn HealthSource,
    servers: &[String],
    settings: &RolloutSettings,
    boots: Option<&BootReports<'_>>,
) -> Result<Result<(), String>, AwsError> {
    rigger_engine::rollout::wait_healthy(servers, settings, async || {
        observe(source, servers, boots).await
    })
    .await
}

/// One look at `servers`: the health source's states, overlaid with their boot reports.
async fn observe(
    source: &dyn HealthSource,
    servers: &[String],
    boots: Option<&BootReports<'_>>,
) -> Result<Observation, AwsError> {
    let mut states = source.states(servers).await?;
    let failed = match boots {
        Some(boots) => boots.overlay(servers, &mut states).await?,
        None => BTreeMap::new(),
    };
    Ok(Observation { states, failed })
}

/// The load balancer's view, in the gate's terms: `InService` / `healthy` is `UP`; anything
/// else is the state with the load balancer's reason.
pub(crate) fn gate_state(state: &str, reason: &str) -> String {
    if state == "InService" || state == "healthy" {
        "UP".into()
    } else if reason.is_empty() {
        state.to_owned()
    } else {
        format!("{state} ({reason})")
    }
}

/// Web servers: the load balancer's instance health.
pub(crate) struct LoadBalancerHealth<'a> {
    pub clients: &'a Clients,
    pub lb: &'a crate::live::LiveLoadBalancer,
    pub name: String,
}

impl HealthSource for LoadBalancerHealth<'_> {
    fn states<'a>(
        &'a self,
        _servers: &'a [String],
    ) -> BoxFuture<'a, Result<BTreeMap<String, String>, AwsError>> {
        Box::pin(async move {
            Ok(
                crate::loadbalancer::instance_health_reasons(self.clients, self.lb, &self.name)
                    .await?
                    .into_iter()
                    .map(|(id, (state, reason))| (id, gate_state(&state, &reason)))
                    .collect(),
            )
        })
    }
}

/// Workers (no load balancer): the group's view, `InService` and `Healthy`.
pub(crate) struct GroupHealth<'a> {
    pub clients: &'a Clients,
    pub group: String,
}

impl HealthSource for GroupHealth<'_> {
    fn states<'a>(
        &'a self,
        _servers: &'a [String],
    ) -> BoxFuture<'a, Result<BTreeMap<String, String>, AwsError>> {
        Box::pin(async move {
            let members = members(self.clients, &self.group).await?;
            Ok(members
                .into_iter()
                .map(|m| {
                    let up = m.lifecycle == "InService" && m.health == "Healthy";
                    let state = if up {
                        "UP".to_owned()
                    } else {
                        format!("{} {}", m.lifecycle, m.health)
                    };
                    (m.id, state)
                })
                .collect())
        })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub id: String,
    pub lifecycle: String,
    pub health: String,
}

/// The group's instances that are in service or on their way.
pub(crate) async fn members(clients: &Clients, group: &str) -> Result<Vec<Member>, AwsError> {
    let answer = clients
        .autoscaling
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(group)
        .send()
        .await
        .op("DescribeAutoScalingGroups", group)?;
    Ok(answer
        .auto_scaling_groups()
        .first()
        .map(|g| {
            g.instances()
                .iter()
                .filter_map(|i| {
                    let lifecycle = i.lifecycle_state()?.as_str().to_owned();
                    (lifecycle == "InService" || lifecycle.starts_with("Pending")).then(|| Member {
                        id: i.instance_id().unwrap_or_default().to_owned(),
                        lifecycle,
                        health: i.health_status().unwrap_or_default().to_owned(),
                    })
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The steps of `plan` of these kinds and action: a deploy makes the new release's launch
/// templates (or configurations) and deletes the old ones with the same code as `up`.
pub(crate) fn only(plan: &Plan, action: Action) -> Plan {
    Plan {
        steps: plan
            .steps
            .iter()
            .filter(|s| {
                s.action == action
                    && matches!(
                        s.id.kind,
                        ResourceKind::LaunchTemplate | ResourceKind::LaunchConfiguration
                    )
            })
            .cloned()
            .collect(),
        ..plan.clone()
    }
}

pub(crate) use rigger_engine::rollout::GROUP_ROLES;

/// What a rollout needs from the servers themselves, which this crate does not reach (the
/// CLI does, over SSH).
pub trait ServerOps: Send + Sync {
    /// Stops Celery on old workers with a warm shutdown (running tasks finish), waiting up to
    /// `timeout`; `Err` says why it could not.
    fn stop_workers(&self, instances: &[String], timeout: Duration) -> Result<(), String>;
    /// Evidence from servers that failed their health check: the health probe's status and
    /// body, the last lines of the app's log. Empty when there is none.
    fn diagnose(&self, instances: &[String]) -> String;
}

/// For when no server can be reached (an emulator's servers, tests): says so.
pub struct NoServerAccess(pub &'static str);

impl ServerOps for NoServerAccess {
    fn stop_workers(&self, _instances: &[String], _timeout: Duration) -> Result<(), String> {
        Err(self.0.to_owned())
    }

    fn diagnose(&self, _instances: &[String]) -> String {
        String::new()
    }
}

/// Everything a rollout runs with.
pub struct Rollout<'a> {
    pub options: RolloutSettings,
    pub servers: &'a dyn ServerOps,
    /// Where the health gate's observations come from; `None`: the load balancer (web) and
    /// the group (workers).
    pub health: Option<&'a dyn HealthSource>,
    pub report: &'a dyn Progress,
}

/// A rollout in progress, kept in SSM (`/<project>/<env>/deploy/rollout`) from before the
/// first change until the end, so that a rollout interrupted half-way is recognised by the
/// next one: it goes back to the group sizes from before, removes servers the interrupted one
/// detached, and rolls back (if it must) to the release from before the interrupted one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub release: String,
    /// The release the environment ran before.
    pub previous: String,
    /// Each group's desired count before the rollout raised it.
    pub desired: BTreeMap<String, i32>,
}

fn rollout_parameter(env: &AwsEnvironment) -> String {
    env.parameter("deploy/rollout")
}

async fn read_rollout(
    env: &AwsEnvironment,
    clients: &Clients,
) -> Result<Option<RolloutRecord>, AwsError> {
    crate::parameters::get_json(clients, &rollout_parameter(env)).await
}

async fn write_rollout(
    env: &AwsEnvironment,
    clients: &Clients,
    record: Option<&RolloutRecord>,
) -> Result<(), AwsError> {
    let name = rollout_parameter(env);
    match record {
        Some(record) => {
            let value = serde_json::to_string(record).expect("serializable");
            crate::parameters::put(clients, &name, &value).await
        }
        None => crate::parameters::delete(clients, &name).await,
    }
}

/// The release an operation in the lock was about (`deploy <id>`, `rollback to <id>`).
fn release_of(operation: &str) -> &str {
    operation.rsplit(' ').next().unwrap_or_default()
}

impl crate::Provider {
    /// Takes the deploy lock (in the environment's bucket, made if `up` did not yet) and
    /// uploads the release there. The lock is renewed from now on; the caller runs the
    /// migrations next, then [`Self::finish_deploy`] (or [`Self::abandon_deploy`] when they
    /// fail: nothing was switched).
    pub async fn start_deploy(
        &self,
        artifact: &Artifact,
        requester: &Requester,
        report: &dyn Progress,
    ) -> Result<StartedDeploy, AwsError> {
        // Nothing is uploaded or locked for an environment that is not up.
        let (_, live) = self.observe().await?;
        self.running_release(&live)?;
        let bucket = crate::releases::ensure(&self.env, &self.clients, report).await?;
        let started = rigger_engine::clock::unix_now();
        let lock = self
            .take_lock(
                requester,
                &format!("deploy {}", artifact.id),
                started,
                report,
            )
            .await?;
        let uploaded = async {
            report.report(&format!(
                "uploading release {} to s3://{bucket}/{}",
                artifact.id,
                crate::releases::object_key(&artifact.id)
            ));
            crate::releases::upload(&self.clients, &bucket, &artifact.id, &artifact.tarball).await
        }
        .await;
        match uploaded {
            Ok(()) => Ok(StartedDeploy {
                release: artifact.id.clone(),
                revision: artifact.revision.clone(),
                bucket,
                lock,
            }),
            Err(error) => {
                lock.release().await?;
                Err(error)
            }
        }
    }

    /// Takes the deploy lock to go back to a release already in the bucket, without
    /// rebuilding it: the one [`rigger_plan::deploys::rollback_target`] chooses.
    /// The caller goes on with [`Self::finish_deploy`] (no migrations: the release ran them
    /// when it was first deployed).
    pub async fn start_rollback(
        &self,
        to: Option<&str>,
        requester: &Requester,
        report: &dyn Progress,
    ) -> Result<StartedDeploy, AwsError> {
        let (_, live) = self.observe().await?;
        let current = self.current_release(&live).unwrap_or_default();
        let history = history(&self.env, &self.clients).await?;
        let release =
            rigger_plan::deploys::rollback_target(&history, &current, to).map_err(|why| {
                AwsError::precondition(
                    "(rollback)",
                    to.unwrap_or(&current),
                    why.problem(),
                    why.help(),
                )
            })?;
        // The revision it was built from, as recorded when it was deployed.
        let revision = history
            .iter()
            .rev()
            .find(|r| r.release == release)
            .map(|r| r.revision.clone())
            .unwrap_or_default();
        let bucket = crate::releases::find(&self.env, &self.clients)
            .await?
            .unwrap_or_default();
        if bucket.is_empty() || !crate::releases::exists(&self.clients, &bucket, &release).await? {
            return Err(AwsError::precondition(
                "HeadObject",
                crate::releases::object_key(&release),
                format!(
                    "release {} is no longer in the environment's bucket",
                    release
                ),
                "deploy its revision again with `rigger deploy --revision`",
            ));
        }
        let started = rigger_engine::clock::unix_now();
        let lock = self
            .take_lock(
                requester,
                &format!("rollback to {release}"),
                started,
                report,
            )
            .await?;
        Ok(StartedDeploy {
            release,
            revision,
            bucket,
            lock,
        })
    }

    /// Takes the deploy lock for `operation` (a deploy, a rollback, a database operation) at
    /// `started`, renewed every [`crate::Provider::lock_renewal`] from now on until the
    /// keeper's release; a stale lock taken over is reported, and recorded as an interrupted
    /// deploy when it was one.
    pub async fn take_lock(
        &self,
        requester: &Requester,
        operation: &str,
        started: u64,
        report: &dyn Progress,
    ) -> Result<LockKeeper, AwsError> {
        let acquired =
            acquire_lock(&self.env, &self.clients, requester, operation, started).await?;
        let keeper =
            match LockKeeper::start(&self.clients, acquired.lock.clone(), self.lock_renewal) {
                Ok(keeper) => keeper,
                Err(error) => {
                    release_lock(&self.clients, &acquired.lock).await?;
                    return Err(error);
                }
            };
        if let Some(stale) = acquired.interrupted {
            report.report(&format!(
                "taking over the deploy lock of an interrupted operation: {stale}"
            ));
            // Only deploys and rollbacks belong in the deploy history.
            if !(stale.operation.starts_with("deploy ")
                || stale.operation.starts_with("rollback to "))
            {
                return Ok(keeper);
            }
            let entry = DeployRecord {
                release: release_of(&stale.operation).to_owned(),
                revision: String::new(),
                by: stale.who.clone(),
                started: stale.since,
                finished: started,
                result: "interrupted".into(),
                reason: format!(
                    "its process ended before it finished; taken over by {}",
                    requester.who
                ),
            };
            if let Err(error) = record(&self.env, &self.clients, &entry).await {
                keeper.release().await?;
                return Err(error);
            }
        }
        Ok(keeper)
    }

    /// Records a deploy that stopped before anything switched (a failed migration) and
    /// releases the lock.
    pub async fn abandon_deploy(
        &self,
        deploy: StartedDeploy,
        reason: &str,
    ) -> Result<DeployRecord, AwsError> {
        self.end_deploy(deploy, "failed", reason.to_owned()).await
    }

    /// Rolls the release out, records the result and releases the lock. A rollback is not an
    /// error: the record says `rolled back` and why (`failed` when rolling back failed too).
    pub async fn finish_deploy(
        &self,
        deploy: StartedDeploy,
        rollout: &Rollout<'_>,
    ) -> Result<DeployRecord, AwsError> {
        // The lock's keeper renews it meanwhile.
        let rolled = self.roll_out(&deploy.release, rollout).await;
        match rolled {
            Ok(RolloutOutcome::Completed) => {
                self.end_deploy(deploy, "succeeded", String::new()).await
            }
            Ok(RolloutOutcome::RolledBack { reason }) => {
                self.end_deploy(deploy, "rolled back", reason).await
            }
            Ok(RolloutOutcome::RollbackFailed { reason, rollback }) => {
                let reason = format!("{reason}; then rolling back failed too: {rollback}");
                self.end_deploy(deploy, "failed", reason).await
            }
            Err(error) => {
                let _ = self.end_deploy(deploy, "failed", error.to_string()).await;
                Err(error)
            }
        }
    }

    async fn end_deploy(
        &self,
        deploy: StartedDeploy,
        result: &str,
        reason: String,
    ) -> Result<DeployRecord, AwsError> {
        let holder = deploy.lock.holder();
        let reason = match (deploy.lock.lost(), reason.is_empty()) {
            (Some(lost), true) => format!("lost the deploy lock during the deploy: {lost}"),
            (Some(lost), false) => {
                format!("{reason}; lost the deploy lock during the deploy: {lost}")
            }
            (None, _) => reason,
        };
        let entry = DeployRecord {
            release: deploy.release,
            revision: deploy.revision,
            by: holder.who,
            started: holder.since,
            finished: rigger_engine::clock::unix_now(),
            result: result.to_owned(),
            reason,
        };
        let recorded = record(&self.env, &self.clients, &entry).await;
        if !deploy.lock.release().await? {
            tracing::warn!(
                "the deploy lock was no longer this deploy's when it ended; left to its holder"
            );
        }
        recorded.map(|()| entry)
    }

    /// The group's largest size in rigger.toml (a rollout adds its surge on top, and puts it
    /// back after, whatever an interrupted rollout left).
    fn configured_max(&self, role: Role) -> i32 {
        let env = self.env.env();
        let sizing = if role == Role::Web {
            &env.web
        } else {
            &env.worker
        };
        i32::try_from(sizing.max).unwrap_or(i32::MAX)
    }

    /// What an interrupted rollout (`interrupted`, its record) left behind in `live`, undone:
    /// servers it detached but did not terminate, group counts it raised. Whether it changed
    /// anything.
    async fn recover_interrupted_rollout(
        &self,
        live: &crate::Live,
        interrupted: Option<&RolloutRecord>,
        report: &dyn Progress,
    ) -> Result<bool, AwsError> {
        let mut changed = false;
        let detached: Vec<String> = live
            .detached_group_instances()
            .iter()
            .map(|i| i.id.clone())
            .collect();
        if let Some(record) = interrupted {
            report.report(&format!(
                "an earlier rollout of {} (from {}) was interrupted; putting its groups back first",
                record.release, record.previous
            ));
            for (group, desired) in &record.desired {
                if live
                    .groups
                    .get(group)
                    .is_some_and(|g| g.desired > i64::from(*desired))
                {
                    self.clients
                        .autoscaling
                        .set_desired_capacity()
                        .auto_scaling_group_name(group)
                        .desired_capacity(*desired)
                        .honor_cooldown(false)
                        .send()
                        .await
                        .op("SetDesiredCapacity", group)?;
                    changed = true;
                }
            }
        }
        if !detached.is_empty() {
            changed = true;
            report.report(&format!(
                "terminating {} left detached by an interrupted rollout",
                detached.join(", ")
            ));
            if let Some(lb) = live.load_balancer(self.env.aws().load_balancer) {
                crate::loadbalancer::deregister(
                    &self.clients,
                    lb,
                    &self.env.names.load_balancer(),
                    &detached,
                )
                .await?;
            }
            self.clients
                .ec2
                .terminate_instances()
                .set_instance_ids(Some(detached.clone()))
                .send()
                .await
                .op("TerminateInstances", detached.join(", "))?;
        }
        Ok(changed)
    }

    /// The release the groups run; an error saying to run `up` when there are no groups.
    fn running_release(&self, live: &crate::Live) -> Result<String, AwsError> {
        self.current_release(live).ok_or_else(|| {
            AwsError::precondition(
                "(deploy)",
                self.env.names.group(Role::Web),
                "the environment's groups do not exist",
                "run `rigger up` first",
            )
        })
    }

    /// Makes the release's launch templates and rolls every group over to them with the
    /// engine's rollout; a failed batch puts every group back on its previous release.
    pub async fn roll_out(
        &self,
        release: &str,
        rollout: &Rollout<'_>,
    ) -> Result<RolloutOutcome, AwsError> {
        let report = rollout.report;
        let (mut network, mut live) = self.observe().await?;
        let interrupted = read_rollout(&self.env, &self.clients).await?;
        if self
            .recover_interrupted_rollout(&live, interrupted.as_ref(), report)
            .await?
        {
            (network, live) = self.observe().await?;
        }
        let current = self.running_release(&live)?;
        // After an interruption the groups may point at a release that never finished: a
        // rollback goes to the one from before it.
        let previous = interrupted
            .as_ref()
            .map_or_else(|| current.clone(), |r| r.previous.clone());
        if current == release && interrupted.is_none() {
            report.report(&format!("release {release} is already the current one"));
            return Ok(RolloutOutcome::Completed);
        }
        let record = RolloutRecord {
            release: release.to_owned(),
            previous: previous.clone(),
            desired: match &interrupted {
                Some(old) => old.desired.clone(),
                None => GROUP_ROLES
                    .iter()
                    .filter_map(|role| {
                        let name = self.env.names.group(*role);
                        let group = live.groups.get(&name)?;
                        Some((name, i32::try_from(group.desired).unwrap_or(i32::MAX)))
                    })
                    .collect(),
            },
        };
        write_rollout(&self.env, &self.clients, Some(&record)).await?;
        let new_topology = self
            .desired(&live, release)
            .map_err(crate::topology_error)?;
        let full = rigger_plan::plan(&live.observed(&self.env), &new_topology);
        report.report(&format!("making the launch templates of release {release}"));
        crate::apply::apply(
            &self.env,
            &self.clients,
            &network,
            &live,
            &new_topology,
            &only(&full, Action::Create),
            self.waits,
            report,
        )
        .await?;
        let (_, with_new) = self.observe().await?;
        let boot_reports = BootReports {
            env: &self.env,
            clients: &self.clients,
        };
        let mut groups = Groups {
            provider: self,
            live: &with_new,
            rollout,
            boots: self.servers_are_machines().await?.then_some(&boot_reports),
            load_balancer: with_new
                .load_balancer(self.env.aws().load_balancer)
                .cloned(),
            before_launch: BTreeMap::new(),
        };
        let outcome =
            rigger_engine::rollout::roll_out(&mut groups, release, &previous, &rollout.options)
                .await?;
        let kept = match outcome {
            RolloutOutcome::Completed => release,
            _ => previous.as_str(),
        };
        self.delete_unused_templates(kept, report).await?;
        write_rollout(&self.env, &self.clients, None).await?;
        Ok(outcome)
    }

    /// Deletes the launch templates (or configurations) of releases other than `release`.
    async fn delete_unused_templates(
        &self,
        release: &str,
        report: &dyn Progress,
    ) -> Result<(), AwsError> {
        let (network, live) = self.observe().await?;
        let topology = self
            .desired(&live, release)
            .map_err(crate::topology_error)?;
        let full = rigger_plan::plan(&live.observed(&self.env), &topology);
        crate::apply::apply(
            &self.env,
            &self.clients,
            &network,
            &live,
            &topology,
            &only(&full, Action::Delete),
            self.waits,
            report,
        )
        .await?;
        Ok(())
    }

    async fn set_max(&self, group: &str, max: i32) -> Result<(), AwsError> {
        self.clients
            .autoscaling
            .update_auto_scaling_group()
            .auto_scaling_group_name(group)
            .max_size(max)
            .send()
            .await
            .op("UpdateAutoScalingGroup", group)?;
        Ok(())
    }

    /// Old servers leave: out of the group (which shrinks by as many); web servers out of the
    /// load balancer with connection draining, workers with a warm shutdown of Celery; then
    /// terminated.
    async fn retire(
        &self,
        role: Role,
        lb: Option<&crate::live::LiveLoadBalancer>,
        instances: &[String],
        rollout: &Rollout<'_>,
    ) -> Result<(), AwsError> {
        let group = self.env.names.group(role);
        self.clients
            .autoscaling
            .detach_instances()
            .auto_scaling_group_name(&group)
            .set_instance_ids(Some(instances.to_vec()))
            .should_decrement_desired_capacity(true)
            .send()
            .await
            .op("DetachInstances", &group)?;
        match (role, lb) {
            (Role::Web, Some(lb)) => {
                crate::loadbalancer::deregister(
                    &self.clients,
                    lb,
                    &self.env.names.load_balancer(),
                    instances,
                )
                .await?;
                tokio::time::sleep(rollout.options.drain_timeout).await;
            }
            (Role::Worker, _) => {
                let timeout = rollout.options.worker_stop_timeout;
                rollout.report.report(&format!(
                    "{group}: warm shutdown of Celery on {} (up to {} s for running tasks)",
                    instances.join(", "),
                    timeout.as_secs()
                ));
                if let Err(why) = rollout.servers.stop_workers(instances, timeout) {
                    rollout.report.report(&format!(
                        "warning: no warm shutdown on {}: {why}; tasks they were running are redelivered only if the app acknowledges late",
                        instances.join(", ")
                    ));
                }
            }
            _ => {}
        }
        self.clients
            .ec2
            .terminate_instances()
            .set_instance_ids(Some(instances.to_vec()))
            .send()
            .await
            .op("TerminateInstances", instances.join(", "))?;
        Ok(())
    }
}

/// The environment's Auto Scaling groups as the engine's rollout drives them.
struct Groups<'a> {
    provider: &'a crate::Provider,
    /// The environment with the new release's launch templates made.
    live: &'a crate::Live,
    rollout: &'a Rollout<'a>,
    /// Where new servers' boot reports are read, when they must report before they count.
    boots: Option<&'a BootReports<'a>>,
    load_balancer: Option<crate::live::LiveLoadBalancer>,
    /// Each group's servers before its current batch was launched: anything else in the
    /// group belongs to the batch (its servers, or the group's replacements of them).
    before_launch: BTreeMap<Role, Vec<String>>,
}

impl Groups<'_> {
    fn group(&self, role: Role) -> String {
        self.provider.env.names.group(role)
    }

    /// The health of `servers` as the gate reads it: the load balancer's instance health for
    /// web servers, the group's for workers (or the rollout's own source, in tests), with the
    /// boot reports of servers that are machines.
    async fn observe_health(
        &self,
        role: Role,
        servers: &[String],
    ) -> Result<Observation, AwsError> {
        let clients = &self.provider.clients;
        match (self.rollout.health, role, &self.load_balancer) {
            (Some(source), _, _) => observe(source, servers, self.boots).await,
            (None, Role::Web, Some(lb)) => {
                let source = LoadBalancerHealth {
                    clients,
                    lb,
                    name: self.provider.env.names.load_balancer(),
                };
                observe(&source, servers, self.boots).await
            }
            _ => {
                let source = GroupHealth {
                    clients,
                    group: self.group(role),
                };
                observe(&source, servers, self.boots).await
            }
        }
    }
}

impl RolloutTarget for Groups<'_> {
    type Error = AwsError;

    fn has_group(&self, role: Role) -> bool {
        self.live.groups.contains_key(&self.group(role))
    }

    fn group_name(&self, role: Role) -> String {
        self.group(role)
    }

    /// Every server of the group: which release an instance was launched from is not
    /// recorded on it, so a rollout replaces them all (after an interrupted rollout too).
    async fn outdated(&mut self, role: Role, _release: &str) -> Result<Vec<String>, AwsError> {
        let members = members(&self.provider.clients, &self.group(role)).await?;
        Ok(members.into_iter().map(|m| m.id).collect())
    }

    /// Points the group at the release's launch template and lets it grow by `surge` over
    /// its maximum (or over what it runs, if an interrupted rollout left it larger).
    async fn begin(&mut self, role: Role, release: &str, surge: usize) -> Result<(), AwsError> {
        let group = self.group(role);
        Launch::for_release(&self.provider.env, self.live, role, release)
            .point(&self.provider.clients, &group)
            .await?;
        let running = members(&self.provider.clients, &group).await?.len();
        let max = self
            .provider
            .configured_max(role)
            .max(i32::try_from(running).unwrap_or(i32::MAX));
        self.provider
            .set_max(
                &group,
                max.saturating_add(i32::try_from(surge).unwrap_or(0)),
            )
            .await
    }

    /// Raises the desired count by as many servers as are replaced and waits (up to the
    /// health timeout) for the group to start them.
    async fn launch(
        &mut self,
        role: Role,
        _release: &str,
        replacing: &[String],
    ) -> Result<Launched, AwsError> {
        let group = self.group(role);
        let clients = &self.provider.clients;
        let before: Vec<String> = members(clients, &group)
            .await?
            .into_iter()
            .map(|m| m.id)
            .collect();
        self.before_launch.insert(role, before.clone());
        clients
            .autoscaling
            .set_desired_capacity()
            .auto_scaling_group_name(&group)
            .desired_capacity(i32::try_from(before.len() + replacing.len()).unwrap_or(i32::MAX))
            .honor_cooldown(false)
            .send()
            .await
            .op("SetDesiredCapacity", &group)?;
        let started = tokio::time::Instant::now();
        loop {
            let new: Vec<String> = members(clients, &group)
                .await?
                .into_iter()
                .map(|m| m.id)
                .filter(|id| !before.contains(id))
                .collect();
            if new.len() >= replacing.len()
                || started.elapsed() > self.rollout.options.health_timeout
            {
                return Ok(Launched::Servers(new));
            }
            tokio::time::sleep(self.rollout.options.poll).await;
        }
    }

    /// The load balancer's view (the group's for workers), and a new server that left its
    /// group (its machine failed and the group replaced it, or it was terminated) fails the
    /// batch at once: waiting for it would only run out the health timeout.
    async fn observe(&mut self, role: Role, servers: &[String]) -> Result<Observation, AwsError> {
        let mut observation = self.observe_health(role, servers).await?;
        let in_group: Vec<String> = members(&self.provider.clients, &self.group(role))
            .await?
            .into_iter()
            .map(|m| m.id)
            .collect();
        for gone in servers.iter().filter(|id| !in_group.contains(id)) {
            observation.failed.insert(
                gone.clone(),
                "left its group before it was healthy (terminated: its machine failed, or \
                 something terminated it)"
                    .to_owned(),
            );
        }
        Ok(observation)
    }

    async fn explain(&mut self, _role: Role, servers: &[String]) -> String {
        self.rollout.servers.diagnose(servers)
    }

    /// Terminates them in the group, which shrinks back by as many, and so every other
    /// server the group started since the batch's launch (its replacement of one of them
    /// whose machine failed); then the desired count is what it was before the launch, as a
    /// server already gone could not lower it. One that cannot be terminated (already gone,
    /// say) does not stop the rollback: it is reported.
    async fn discard(&mut self, role: Role, servers: &[String]) -> Result<(), AwsError> {
        let group = self.group(role);
        let clients = &self.provider.clients;
        let mut discarded: Vec<String> = servers.to_vec();
        if let Some(before) = self.before_launch.get(&role) {
            for member in members(clients, &group).await? {
                if !before.contains(&member.id) && !discarded.contains(&member.id) {
                    self.rollout.report.report(&format!(
                        "{group}: discarding {} too, started by the group in place of a new server",
                        member.id
                    ));
                    discarded.push(member.id);
                }
            }
        }
        for instance in &discarded {
            let terminated = clients
                .autoscaling
                .terminate_instance_in_auto_scaling_group()
                .instance_id(instance)
                .should_decrement_desired_capacity(true)
                .send()
                .await
                .op("TerminateInstanceInAutoScalingGroup", instance);
            if let Err(error) = terminated {
                self.rollout.report.report(&format!("warning: {error}"));
            }
        }
        if let Some(before) = self.before_launch.get(&role) {
            clients
                .autoscaling
                .set_desired_capacity()
                .auto_scaling_group_name(&group)
                .desired_capacity(i32::try_from(before.len()).unwrap_or(i32::MAX))
                .honor_cooldown(false)
                .send()
                .await
                .op("SetDesiredCapacity", &group)?;
        }
        Ok(())
    }

    async fn retire(
        &mut self,
        role: Role,
        servers: &[String],
        _settings: &RolloutSettings,
    ) -> Result<(), AwsError> {
        self.provider
            .retire(role, self.load_balancer.as_ref(), servers, self.rollout)
            .await
    }

    /// The group's maximum goes back to rigger.toml's.
    async fn end(&mut self, role: Role) -> Result<(), AwsError> {
        self.provider
            .set_max(&self.group(role), self.provider.configured_max(role))
            .await
    }

    fn report(&mut self, message: &str) {
        self.rollout.report.report(message);
    }
}

/// What a group launches from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Launch {
    /// A launch template's `$Default` version.
    Template(String),
    /// A launch configuration, by its name on AWS.
    Configuration(String),
    Unknown,
}

impl Launch {
    fn for_release(env: &AwsEnvironment, live: &crate::Live, role: Role, release: &str) -> Launch {
        match env.aws().launch {
            rigger_config::LaunchKind::Template => {
                Launch::Template(env.names.launch_template(role, release))
            }
            rigger_config::LaunchKind::Configuration => {
                let name = env.names.launch_configuration(role, release);
                live.launch_configurations_by_name()
                    .into_iter()
                    .find(|(n, _)| *n == name)
                    .map_or(Launch::Unknown, |(_, lc)| {
                        Launch::Configuration(lc.aws_name.clone())
                    })
            }
        }
    }

    async fn point(&self, clients: &Clients, group: &str) -> Result<(), AwsError> {
        let update = clients
            .autoscaling
            .update_auto_scaling_group()
            .auto_scaling_group_name(group);
        let update = match self {
            Launch::Template(name) => update.launch_template(
                aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                    .launch_template_name(name)
                    .version("$Default")
                    .build(),
            ),
            Launch::Configuration(name) => update.launch_configuration_name(name),
            Launch::Unknown => return Ok(()),
        };
        update.send().await.op("UpdateAutoScalingGroup", group)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers from a script: the n-th call gets the n-th answer (the last one repeats).
    struct Scripted(std::sync::Mutex<Vec<BTreeMap<String, String>>>);

    impl HealthSource for Scripted {
        fn states<'a>(
            &'a self,
            _servers: &'a [String],
        ) -> BoxFuture<'a, Result<BTreeMap<String, String>, AwsError>> {
            let mut answers = self.0.lock().unwrap();
            let answer = if answers.len() > 1 {
                answers.remove(0)
            } else {
                answers[0].clone()
            };
            Box::pin(async move { Ok(answer) })
        }
    }

    fn states(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn options() -> RolloutSettings {
        RolloutSettings {
            health_timeout: Duration::from_millis(200),
            poll: Duration::from_millis(10),
            ..RolloutSettings::default()
        }
    }

    #[tokio::test]
    async fn an_unhealthy_batch_is_refused_with_the_load_balancers_reason() {
        let reason = gate_state(
            "OutOfService",
            "Instance: Instance has failed at least the UnhealthyThreshold number of health checks consecutively.",
        );
        let source = Scripted(std::sync::Mutex::new(vec![states(&[("i-new", &reason)])]));
        let verdict = wait_healthy(&source, &["i-new".into()], &options(), None)
            .await
            .unwrap();
        let why = verdict.unwrap_err();
        assert!(
            why.contains("i-new: OutOfService (Instance: Instance has failed"),
            "{why}"
        );
        assert!(why.starts_with("not healthy within 0 s"), "{why}");
    }

    #[tokio::test]
    async fn a_batch_passes_after_stable_healthy_checks() {
        let source = Scripted(std::sync::Mutex::new(vec![
            states(&[("i-new", "OutOfService")]),
            states(&[("i-new", &gate_state("InService", ""))]),
        ]));
        let verdict = wait_healthy(&source, &["i-new".into()], &options(), None)
            .await
            .unwrap();
        assert_eq!(verdict, Ok(()));
    }

    #[tokio::test]
    async fn a_flapping_server_rolls_back() {
        let source = Scripted(std::sync::Mutex::new(
            (0..100)
                .map(|n| {
                    states(&[(
                        "i-new",
                        if n % 2 == 0 {
                            "UP"
                        } else {
                            "unhealthy (Target.Timeout)"
                        },
                    )])
                })
                .collect(),
        ));
        let verdict = wait_healthy(&source, &["i-new".into()], &options(), None)
            .await
            .unwrap();
        assert!(verdict.is_err());
    }

    #[test]
    fn healthy_states_become_up() {
        assert_eq!(gate_state("InService", "N/A"), "UP");
        assert_eq!(gate_state("healthy", ""), "UP");
        assert_eq!(
            gate_state(
                "unhealthy",
                "Target.ResponseCodeMismatch: Health checks failed with these codes: [503]"
            ),
            "unhealthy (Target.ResponseCodeMismatch: Health checks failed with these codes: [503])"
        );
    }
}
