//! The rolling replacement of the groups' servers, written once for every provider: a deploy
//! and a rollback are both "make every group server run release R".
//!
//! Per group, web first (the load balancer decides) then the worker: the servers not on the
//! release, in batches ([`batches`]); per batch, launch as many new servers, feed the
//! [`HealthGate`] from [`RolloutTarget::observe`] until every new server is healthy (a stable
//! streak of checks) or the health timeout passes or one fails outright, then retire the
//! batch's old servers (web: drained from the load balancer; worker: Celery's warm shutdown),
//! then the next batch. A batch that fails is discarded at once (it never served), and every
//! server the rollout already switched is replaced by the previous release behind the same
//! gate. A provider says how each step is done ([`RolloutTarget`]); the order, the gate, the
//! timeouts and the rollback are here, and are tested in milliseconds with tokio's paused
//! clock.

mod gate;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

pub use gate::{
    BatchSize, DEFAULT_DRAIN_TIMEOUT, DEFAULT_HEALTH_TIMEOUT, DEFAULT_WORKER_STOP_TIMEOUT,
    GateResult, HealthGate, batches,
};
use rigger_topology::Role;

/// The roles with a group, in rollout order.
pub const GROUP_ROLES: [Role; 2] = [Role::Web, Role::Worker];

/// How a rollout goes: servers at a time, and how long each wait may take.
#[derive(Debug, Clone)]
pub struct RolloutSettings {
    pub batch: BatchSize,
    /// A batch's new servers healthy within this, or the rollout rolls back.
    pub health_timeout: Duration,
    /// Consecutive healthy observations a new server needs.
    pub stable_checks: u32,
    /// How long an old web server gets to finish its requests once the load balancer stops
    /// sending it new ones.
    pub drain_timeout: Duration,
    /// How long an old worker's running tasks may take to finish (Celery's warm shutdown).
    pub worker_stop_timeout: Duration,
    /// How often the gate asks for health. Providers differ: a local HAProxy socket is cheap to
    /// ask, an AWS API is rate-limited.
    pub poll: Duration,
}

impl Default for RolloutSettings {
    fn default() -> Self {
        RolloutSettings {
            batch: BatchSize::default(),
            health_timeout: DEFAULT_HEALTH_TIMEOUT,
            stable_checks: 2,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            worker_stop_timeout: DEFAULT_WORKER_STOP_TIMEOUT,
            poll: Duration::from_secs(2),
        }
    }
}

/// One look at a batch's new servers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation {
    /// Each server's state in the gate's terms: `UP`, or what the load balancer (or group)
    /// says instead, with its reason. A server not listed is "not registered".
    pub states: BTreeMap<String, String>,
    /// Servers that failed outright (a process died, the boot script reported a failure),
    /// with why: the batch fails at once instead of waiting for the timeout.
    pub failed: BTreeMap<String, String>,
}

/// What [`RolloutTarget::launch`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launched {
    /// The new servers, one per server they replace.
    Servers(Vec<String>),
    /// The batch could not be started: the servers that were (to be discarded), and why.
    Failed { servers: Vec<String>, why: String },
}

/// How a provider does each step of a rollout. Every method acts on one group (`role`). An
/// `Err` is a provider failure (an API call or a state file): the rollout stops where it is,
/// and the provider's recovery of an interrupted rollout finishes it (AWS: the rollout
/// record; local: the supervisor's start-up).
pub trait RolloutTarget: Send {
    type Error: Send;

    /// Whether the environment has this group at all.
    fn has_group(&self, role: Role) -> bool;
    /// The group's name in what the operator reads (AWS: the Auto Scaling group's).
    fn group_name(&self, role: Role) -> String {
        role.as_str().to_owned()
    }
    /// The group's servers that do not run `release`, oldest first.
    fn outdated(
        &mut self,
        role: Role,
        release: &str,
    ) -> impl Future<Output = Result<Vec<String>, Self::Error>> + Send;
    /// From now on the group launches `release`, and may grow by `surge` servers over its
    /// maximum while old and new servers overlap.
    fn begin(
        &mut self,
        role: Role,
        release: &str,
        surge: usize,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Starts one new server of `release` per server in `replacing` (which still serve).
    fn launch(
        &mut self,
        role: Role,
        release: &str,
        replacing: &[String],
    ) -> impl Future<Output = Result<Launched, Self::Error>> + Send;
    /// The health of new servers, as the load balancer (web) or the group (worker) sees it.
    fn observe(
        &mut self,
        role: Role,
        servers: &[String],
    ) -> impl Future<Output = Result<Observation, Self::Error>> + Send;
    /// Evidence from servers that did not pass the gate (the health probe's answer, the last
    /// lines of the app's log); empty when there is none.
    fn explain(&mut self, role: Role, servers: &[String]) -> impl Future<Output = String> + Send;
    /// Removes servers of a failed batch at once (they never served): the group shrinks back.
    fn discard(
        &mut self,
        role: Role,
        servers: &[String],
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Old servers leave gracefully: a web server drained from the load balancer (up to the
    /// drain timeout), a worker's Celery stopped warm (up to the worker stop timeout), then
    /// removed; the group shrinks by as many.
    fn retire(
        &mut self,
        role: Role,
        servers: &[String],
        settings: &RolloutSettings,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// The group is done with this release (its maximum goes back to the configured one).
    fn end(&mut self, role: Role) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// A step's progress, for the operator.
    fn report(&mut self, message: &str);
}

/// How a rollout ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutOutcome {
    /// Every group server runs the release.
    Completed,
    /// A batch failed (why), and every group is back on the previous release.
    RolledBack { reason: String },
    /// A batch failed (`reason`), and rolling back was not healthy either (`rollback`).
    RollbackFailed { reason: String, rollback: String },
}

/// Makes every group server run `release`, batch by batch behind the health gate; if a batch
/// fails, puts every group back on `previous` the same way.
pub async fn roll_out<T: RolloutTarget>(
    target: &mut T,
    release: &str,
    previous: &str,
    settings: &RolloutSettings,
) -> Result<RolloutOutcome, T::Error> {
    // Per group begun: the servers this rollout launched that passed the gate and serve.
    let mut switched: Vec<(Role, Vec<String>)> = Vec::new();
    let mut failure = None;
    for role in GROUP_ROLES {
        if !target.has_group(role) {
            continue;
        }
        let old = target.outdated(role, release).await?;
        let replaced = replace(target, role, release, &old, settings).await?;
        switched.push((role, replaced.launched));
        if let Some(reason) = replaced.failed {
            failure = Some(reason);
            break;
        }
    }
    let Some(reason) = failure else {
        return Ok(RolloutOutcome::Completed);
    };
    target.report(&format!("rolling back to release {previous}: {reason}"));
    let mut rollback_failures = Vec::new();
    for (role, launched) in &switched {
        let again = replace(target, *role, previous, launched, settings).await?;
        if let Some(why) = again.failed {
            let group = target.group_name(*role);
            target.report(&format!(
                "warning: rolling {group} back was not healthy either: {why}"
            ));
            rollback_failures.push(why);
        }
    }
    Ok(if rollback_failures.is_empty() {
        RolloutOutcome::RolledBack { reason }
    } else {
        RolloutOutcome::RollbackFailed {
            reason,
            rollback: rollback_failures.join("; "),
        }
    })
}

/// Puts every group server on `release` the same way, with nothing to fall back to: the
/// recovery of a rollout cut off half-way, towards the release the groups run. `Ok(Err(why))`
/// when a batch failed (its servers discarded, the rest left as they are).
pub async fn finish_on<T: RolloutTarget>(
    target: &mut T,
    release: &str,
    settings: &RolloutSettings,
) -> Result<Result<(), String>, T::Error> {
    for role in GROUP_ROLES {
        if !target.has_group(role) {
            continue;
        }
        let old = target.outdated(role, release).await?;
        if let Some(why) = replace(target, role, release, &old, settings).await?.failed {
            return Ok(Err(why));
        }
    }
    Ok(Ok(()))
}

/// What [`replace`] did to one group.
struct Replaced {
    /// New servers that passed the gate and now serve.
    launched: Vec<String>,
    /// Why a batch failed (its servers are already discarded).
    failed: Option<String>,
}

/// Replaces `old` (servers of the group) with servers of `release`, batch by batch.
async fn replace<T: RolloutTarget>(
    target: &mut T,
    role: Role,
    release: &str,
    old: &[String],
    settings: &RolloutSettings,
) -> Result<Replaced, T::Error> {
    let group = target.group_name(role);
    let plan = batches(old, settings.batch);
    let surge = plan.iter().map(Vec::len).max().unwrap_or(0);
    target.begin(role, release, surge).await?;
    let mut launched = Vec::new();
    for batch in plan {
        target.report(&format!(
            "{group}: launching {} server(s) of {release} to replace {}",
            batch.len(),
            batch.join(", ")
        ));
        let (new, verdict) = match target.launch(role, release, &batch).await? {
            Launched::Servers(new) if new.len() == batch.len() => {
                let verdict =
                    wait_healthy(&new, settings, async || target.observe(role, &new).await).await?;
                (new, verdict)
            }
            Launched::Servers(new) => {
                let why = format!(
                    "only {} of {} new server(s) started within {} s",
                    new.len(),
                    batch.len(),
                    settings.health_timeout.as_secs()
                );
                (new, Err(why))
            }
            Launched::Failed { servers, why } => (servers, Err(why)),
        };
        if let Err(why) = verdict {
            let evidence = target.explain(role, &new).await;
            let reason = if evidence.is_empty() {
                format!("{group}: {why}")
            } else {
                format!("{group}: {why}\n{evidence}")
            };
            target.discard(role, &new).await?;
            target.end(role).await?;
            return Ok(Replaced {
                launched,
                failed: Some(reason),
            });
        }
        target.report(&format!(
            "{group}: {} healthy; retiring {}",
            new.join(", "),
            batch.join(", ")
        ));
        launched.extend(new);
        target.retire(role, &batch, settings).await?;
    }
    target.end(role).await?;
    Ok(Replaced {
        launched,
        failed: None,
    })
}

/// Feeds the gate with `observe` every `settings.poll` until it decides: `Ok(Ok(()))` when
/// every server is healthy, `Ok(Err(why))` when one failed or time ran out (each unhealthy
/// server with the last state seen).
pub async fn wait_healthy<E>(
    servers: &[String],
    settings: &RolloutSettings,
    mut observe: impl AsyncFnMut() -> Result<Observation, E>,
) -> Result<Result<(), String>, E> {
    let mut gate = HealthGate::new(
        servers.to_vec(),
        settings.health_timeout,
        settings.stable_checks,
    );
    let started = tokio::time::Instant::now();
    loop {
        let observation = observe().await?;
        match gate.observe(started.elapsed(), &observation.states, &observation.failed) {
            GateResult::Healthy => return Ok(Ok(())),
            GateResult::Waiting => tokio::time::sleep(settings.poll).await,
            GateResult::TimedOut { unhealthy } => {
                let list: Vec<String> = unhealthy
                    .iter()
                    .map(|(server, state)| format!("{server}: {state}"))
                    .collect();
                return Ok(Err(format!(
                    "not healthy within {} s: {}",
                    settings.health_timeout.as_secs(),
                    list.join("; ")
                )));
            }
            GateResult::Failed { server, why } => return Ok(Err(format!("{server}: {why}"))),
        }
    }
}

#[cfg(test)]
mod tests;
