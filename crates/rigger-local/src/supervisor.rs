//! The supervisor: one long-running rigger process per local environment that owns every
//! service process, the way an Auto Scaling group and systemd would on AWS.
//!
//! `rigger up` starts it (detached) and follows `status.json` until it reports ready. It brings
//! the environment up in dependency order (cache/queue and the database primary in parallel,
//! then the replicas, then migrations once, then web and worker servers in parallel, then the
//! load balancer), probing each service for readiness. Afterwards it watches: a stand-alone
//! server's dead service is restarted in place; a web or worker server with a dead service is
//! taken out of the load balancer, stopped and replaced by a new server (new id, new address),
//! as an Auto Scaling group replaces an unhealthy instance. SIGHUP re-reads the desired counts
//! (`rigger scale`); SIGTERM stops everything in reverse order and exits.
//!
//! Only one supervisor runs per environment: it holds an exclusive lock on `supervisor.lock`,
//! which the kernel releases when it dies, and the file says who holds it.
//!
//! A supervisor that died leaves its services running; the next one (started at once by the
//! keeper, `crate::keeper`) adopts each that runs exactly what it would start, and restarts or
//! stops the rest (`take_over_leftovers`, `start_server`).

pub mod database;
mod health;
mod rolling;
mod takeover;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use rigger_recipes::{Phase as StepPhase, Probe as RecipeProbe, Recipe, Role, ServiceSpec};
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::apply;
use crate::deploy::DeployRequest;
pub use crate::desired::DesiredCounts;
use crate::environment::LocalEnvironment;
use crate::haproxy;
use crate::prepare::{self, Prepared};
use crate::probe::{self, Probe};
use crate::process::{self, PidRecord, ProcessSpec};
use crate::registry::{Registry, ServerRecord, ServerState};
use crate::release::{self, ReleaseManifest};
use crate::status::{self, GroupStatus, Phase, ProcessStatus, ServerStatus, Status};
use rolling::RolloutFlow;

/// How long a service may take to become ready (RabbitMQ boots in ~5 s; a replica's base
/// backup and a first migration take longer on a busy machine).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an adopted service may take to pass its readiness probe: it was running, so a
/// healthy one passes at once; one that does not is restarted.
const ADOPTED_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the supervisor refreshes status.json and checks the load balancer.
const TICK: Duration = Duration::from_secs(1);
/// A group server that fails to start this many times in a row stops the replacements.
const MAX_LAUNCH_FAILURES: u32 = 3;
/// How long a web server may stay DOWN behind the load balancer before it is replaced.
const LB_DOWN_GRACE: Duration = Duration::from_secs(10);

/// The lock file's text: who runs the supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockHolder {
    pub pid: i32,
    pub user: String,
    pub host: String,
    pub started: u64,
}

/// A running service the supervisor started.
#[derive(Debug)]
struct RunningService {
    server: String,
    spec: ServiceSpec,
    record: PidRecord,
}

/// A service process ended.
#[derive(Debug)]
struct Exit {
    name: String,
    pid: i32,
}

/// Runs the supervisor until SIGTERM or SIGINT. Errors before the environment is ready are
/// recorded in status.json (phase `failed`) for `rigger up` to show.
pub async fn run(env: LocalEnvironment) -> anyhow::Result<()> {
    let _lock = acquire_lock(&env)?;
    let mut supervisor = Supervisor::new(env);
    let result = supervisor.run().await;
    if let Err(error) = &result {
        tracing::error!("{error:#}");
        supervisor.stop_all().await;
        supervisor.publish(Phase::Failed, format!("{error:#}"));
    }
    result
}

/// Takes the environment's supervisor lock, or says who holds it.
fn acquire_lock(env: &LocalEnvironment) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let path = env.paths.supervisor_lock();
    env.paths.create_root()?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    {
        Ok(lock) => lock,
        Err((_, _)) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "another supervisor runs this environment ({})",
                holder.trim()
            );
        }
    };
    let holder = LockHolder {
        pid: std::process::id().try_into().unwrap_or(0),
        user: nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map_or_else(|| "?".into(), |u| u.name),
        host: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_or_else(|_| "?".into(), |h| h.trim().to_owned()),
        started: rigger_engine::clock::unix_now(),
    };
    use std::io::{Seek as _, Write as _};
    lock.set_len(0)?;
    lock.seek(std::io::SeekFrom::Start(0))?;
    lock.write_all(serde_json::to_string(&holder)?.as_bytes())?;
    Ok(lock)
}

/// Reads who holds the supervisor lock, if anyone does (a live process holds the flock).
pub fn lock_holder(env: &LocalEnvironment) -> Option<LockHolder> {
    let path = env.paths.supervisor_lock();
    let file = std::fs::File::open(&path).ok()?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock) {
        // We got the lock: nobody holds it.
        Ok(_unlocked_on_drop) => None,
        Err(_) => serde_json::from_slice(&std::fs::read(&path).ok()?).ok(),
    }
}

struct Supervisor {
    env: Arc<LocalEnvironment>,
    prepared: Option<Arc<Prepared>>,
    registry: Registry,
    services: BTreeMap<String, RunningService>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits_rx: mpsc::UnboundedReceiver<Exit>,
    phase: Phase,
    message: String,
    launch_failures: u32,
    lb_states: BTreeMap<String, String>,
    /// When each in-service web server was first seen DOWN behind the load balancer.
    down_since: BTreeMap<String, tokio::time::Instant>,
    /// The last deploy request handled, so a repeated signal does not deploy twice.
    last_deploy_request: Option<String>,
    /// The last database request handled.
    last_db_request: Option<String>,
    /// How long a new web server may take to answer its health check (a deploy's
    /// `--health-timeout` while it runs).
    health_timeout: Duration,
    /// The counts `rigger scale` set, read at start and at each SIGHUP (a damaged file then
    /// keeps these).
    scaled: DesiredCounts,
    /// Steps a deploy or database operation running beside the loop asks the loop to run
    /// (rolling.rs).
    calls_tx: mpsc::UnboundedSender<rolling::Call>,
    calls_rx: mpsc::UnboundedReceiver<rolling::Call>,
    /// While a deploy or database operation runs beside the loop: the servers its rollout
    /// launched, whose health is its to judge.
    operation_servers: Option<BTreeSet<String>>,
    /// Exits of the rollout's servers, handled as usual once it ends.
    deferred_exits: Vec<Exit>,
    /// Services an earlier supervisor left running, by name, until adopted or stopped.
    leftovers: Leftovers,
}

/// Processes an earlier supervisor left running, by name (`web-1/nginx`).
type Leftovers = Arc<std::sync::Mutex<BTreeMap<String, PidRecord>>>;

impl Supervisor {
    fn new(env: LocalEnvironment) -> Self {
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        let (calls_tx, calls_rx) = mpsc::unbounded_channel();
        let env_paths_for_new = env.paths.clone();
        Supervisor {
            env: Arc::new(env),
            prepared: None,
            registry: Registry::default(),
            services: BTreeMap::new(),
            exits_tx,
            exits_rx,
            phase: Phase::Starting,
            message: "starting".into(),
            launch_failures: 0,
            lb_states: BTreeMap::new(),
            down_since: BTreeMap::new(),
            last_deploy_request: deploy_outcome_request(&env_paths_for_new),
            health_timeout: READY_TIMEOUT,
            scaled: DesiredCounts::default(),
            calls_tx,
            calls_rx,
            operation_servers: None,
            deferred_exits: Vec::new(),
            leftovers: Leftovers::default(),
            last_db_request: last_answered(
                database::read_outcome(&env_paths_for_new).map(|o| o.map(|o| o.request)),
                database::read_request(&env_paths_for_new).map(|r| r.map(|r| r.id)),
            ),
        }
    }

    /// The release new servers run: the last one deployed, or the first `up`'s.
    fn current_release(&self) -> String {
        self.registry
            .current_release
            .clone()
            .unwrap_or_else(|| rigger_plan::deploys::INITIAL_RELEASE.to_owned())
    }

    fn prepared(&self) -> Arc<Prepared> {
        self.prepared
            .clone()
            .expect("prepared before any server starts")
    }

    async fn run(&mut self) -> anyhow::Result<()> {
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let mut deploy_signal = signal(SignalKind::user_defined1())?;
        let mut database_signal = signal(SignalKind::user_defined2())?;
        self.publish(
            Phase::Starting,
            "preparing secrets, certificates, the app's venv and release".into(),
        );

        self.prepared = Some(Arc::new(prepare::prepare(&self.env).await?));
        self.registry = Registry::load(&self.env.paths.registry())?;
        self.scaled = DesiredCounts::load(&self.env.paths.desired())?;
        let switch_finished = self.finish_an_interrupted_switch().await?;
        self.take_over_leftovers().await;
        if self.registry.current_release.is_none() {
            release::ensure_initial(&self.env).await?;
            self.registry.current_release = Some(rigger_plan::deploys::INITIAL_RELEASE.to_owned());
            self.save_registry()?;
        }

        self.record_deploy_left_by_a_dead_supervisor();
        self.record_db_operation_left_by_a_dead_supervisor(switch_finished.as_deref());
        tokio::select! {
            result = self.bring_up() => result?,
            _ = terminate.recv() => { self.shutdown().await; return Ok(()); }
            _ = interrupt.recv() => { self.shutdown().await; return Ok(()); }
        }
        self.publish(
            Phase::Ready,
            "every server is running; every web server is UP".into(),
        );

        let mut tick = tokio::time::interval(TICK);
        // The deploy or database operation running beside the loop, if any: one at a time.
        let mut deploying: Option<(DeployRequest, rolling::DeployStarted, RolloutFlow)> = None;
        let mut db_operation: Option<(database::DbRequest, database::DbFlow)> = None;
        loop {
            let idle = deploying.is_none() && db_operation.is_none();
            tokio::select! {
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
                _ = deploy_signal.recv(), if idle => {
                    if let Some(request) = self.take_deploy_request() {
                        let started = rolling::DeployStarted::now();
                        crate::deploy::Begun::record(
                            &crate::deploy::begun_path(&self.env.paths),
                            &request.id,
                            started.unix(),
                        );
                        let flow = self.start_deploy(&request);
                        deploying = Some((request, started, flow));
                    }
                }
                ended = async { deploying.as_mut().expect("guarded").2.as_mut().await }, if deploying.is_some() => {
                    let (request, started, _) = deploying.take().expect("guarded");
                    self.end_operation();
                    self.record_deploy(&request, started, ended);
                    self.release_the_lock_of_a_dead_requester();
                }
                _ = database_signal.recv(), if idle => {
                    if let Some(request) = self.take_db_request() {
                        crate::deploy::Begun::record(
                            &database::begun_path(&self.env.paths),
                            &request.id,
                            rigger_engine::clock::unix_now(),
                        );
                        let flow = self.start_db_operation(&request);
                        db_operation = Some((request, flow));
                    }
                }
                ended = async { db_operation.as_mut().expect("guarded").1.as_mut().await }, if db_operation.is_some() => {
                    let (request, _) = db_operation.take().expect("guarded");
                    self.end_operation();
                    self.finish_db_request(&request, ended.map_err(|e| ("failed", e)));
                    self.release_the_lock_of_a_dead_requester();
                }
                Some(call) = self.calls_rx.recv() => call(self).await,
                // A change of counts waits for the operation to end.
                _ = hangup.recv(), if idle => {
                    self.launch_failures = 0;
                    if let Err(error) = self.reconcile().await {
                        tracing::error!("reconciling: {error:#}");
                        self.message = format!("{error:#}");
                    }
                }
                Some(exit) = self.exits_rx.recv() => {
                    if let Err(error) = self.handle_exit(exit).await {
                        tracing::error!("{error:#}");
                        self.message = format!("{error:#}");
                    }
                }
                _ = tick.tick() => {
                    self.refresh_lb_states().await;
                    if !idle {
                        // The operation owns the groups' counts and its servers' health until
                        // it ends; status.json still shows every process as it is.
                        let (phase, message) = (self.phase, self.message.clone());
                        self.publish(phase, message);
                        continue;
                    }
                    if let Err(error) = self.replace_servers_down_behind_the_load_balancer().await {
                        tracing::error!("{error:#}");
                        self.message = format!("{error:#}");
                    }
                    if !self.groups_at_desired_count()
                        && let Err(error) = self.heal_groups().await
                    {
                        tracing::error!("{error:#}");
                        self.message = format!("{error:#}");
                    }
                    let healthy = self.groups_healthy();
                    if !healthy && self.phase == Phase::Ready {
                        self.message = self.what_is_unhealthy();
                    }
                    let phase = if healthy { Phase::Ready } else { Phase::Healing };
                    let message = if healthy { "every server is running; every web server is UP".into() } else { self.message.clone() };
                    self.publish(phase, message);
                }
            }
        }
        if let Some((request, started, _)) = deploying.take() {
            // Stopped half-way, a deploy is recorded as interrupted, and the next start rolls
            // back what it left (roll_back_unfinished_deploy).
            let why = "the supervisor was stopped during the deploy; the next \
                       `rigger up` rolls back the servers it had replaced";
            self.record_deploy(&request, started, Err(("interrupted", why.into())));
        }
        if let Some((request, _)) = db_operation.take() {
            // The engine's promote finishes a failover cut off half-way when asked again;
            // pools paused meanwhile resume at their deadline by themselves.
            let why = "interrupted: the supervisor was stopped during the operation; run the \
                       same `rigger db` command again once the environment is up to finish it";
            self.finish_db_request(&request, Err(("interrupted", anyhow!(why))));
        }
        self.shutdown().await;
        Ok(())
    }

    /// A supervisor that died (killed, crashed, or replaced by an upgraded rigger) left its
    /// services running. Those of servers the environment still has wait to be adopted by
    /// [`start_server`], which takes over each one that runs exactly what it would start and
    /// restarts the rest; everything else stops now, so this supervisor owns everything it
    /// supervises.
    async fn take_over_leftovers(&mut self) {
        let servers: BTreeSet<String> = self
            .registry
            .servers
            .iter()
            .map(|s| s.id.clone())
            .chain([self.env.lb_record(&self.current_release()).id])
            .collect();
        let (kept, stopped) = process::sort_leftovers(
            &self.env.paths.servers(),
            |record| {
                record
                    .name
                    .split_once('/')
                    .is_some_and(|(server, _)| servers.contains(server))
            },
            Duration::from_secs(30),
        )
        .await;
        for (name, outcome) in stopped {
            tracing::warn!(process = %name, ?outcome, "stopped a process left by an earlier supervisor");
        }
        if !kept.is_empty() {
            tracing::info!(
                processes = kept.len(),
                "an earlier supervisor left services running: adopting those that are unchanged"
            );
        }
        *self.leftovers.lock().expect("leftovers lock") = kept;
    }

    /// What no server adopted once every server has started: stopped.
    async fn stop_unadopted_leftovers(&mut self) {
        let left = std::mem::take(&mut *self.leftovers.lock().expect("leftovers lock"));
        for record in left.into_values() {
            let outcome = process::stop(&record, record.stop_signal, Duration::from_secs(30)).await;
            tracing::warn!(process = %record.name, ?outcome, "stopped a process left by an earlier supervisor");
        }
    }

    /// The CLI that asked for the operation just ended holds the deploy lock for it; when that
    /// CLI was killed meanwhile, nobody would release it before it expires. Removed only when
    /// stale (its process gone, or expired), by compare-and-delete: a live holder's, or a lock
    /// taken since, stays.
    fn release_the_lock_of_a_dead_requester(&self) {
        let now = rigger_engine::clock::unix_now();
        let paths = &self.env.paths;
        if crate::deploy::lock_holder(paths).is_some()
            && crate::deploy::live_lock_holder(paths, now).is_none()
        {
            match crate::deploy::release(paths, None, now) {
                Ok(Some(holder)) => {
                    tracing::warn!("released the deploy lock of a requester that is gone: {holder}")
                }
                Ok(None) => {}
                Err(error) => tracing::debug!("the deploy lock stays: {error:#}"),
            }
        }
    }

    async fn shutdown(&mut self) {
        self.publish(Phase::Stopping, "stopping every service".into());
        self.stop_all().await;
        let _ = std::fs::remove_file(self.env.paths.status());
    }

    /// Brings every server up in dependency order.
    async fn bring_up(&mut self) -> anyhow::Result<()> {
        // A first bring-up registers web servers before they answer (no traffic flows yet);
        // one that takes over a running load balancer from a dead supervisor gates each web
        // server it starts on its own health check first, as at any other time.
        let balancer_running = self
            .leftovers
            .lock()
            .expect("leftovers lock")
            .keys()
            .any(|name| name.starts_with("lb/"));
        self.registry.register_pending = !balancer_running;
        let result = self.bring_up_servers().await;
        self.registry.register_pending = false;
        result?;
        self.stop_unadopted_leftovers().await;
        self.roll_back_unfinished_deploy().await
    }

    async fn bring_up_servers(&mut self) -> anyhow::Result<()> {
        let prepared = self.prepared();
        // Stand-alone servers keep their ids and addresses across restarts.
        let release = self.current_release();
        self.env
            .add_missing_stand_alone_servers(&mut self.registry, &release);
        self.save_registry()?;

        let stand_alone: Vec<ServerRecord> = self
            .registry
            .servers
            .iter()
            .filter(|s| s.group().is_none())
            .cloned()
            .collect();
        let (first, replicas): (Vec<_>, Vec<_>) = stand_alone
            .into_iter()
            .partition(|s| !s.has_role(Role::DbReplica));
        // The cache/queue server boots alongside the database chain: primary, then its
        // replicas and the release's migrations (both need only the primary).
        self.message = "starting cache, queue and databases; running migrations".into();
        self.publish(Phase::Starting, self.message.clone());
        let (primaries, others): (Vec<_>, Vec<_>) =
            first.into_iter().partition(|s| s.has_role(Role::DbPrimary));
        let launch = self.launcher();
        let env = Arc::clone(&self.env);
        let registry = self.registry.clone();
        let release = self.current_release();
        let database_chain = async {
            let mut launched = launch.start_all(primaries).await;
            if launched.error.is_none() {
                let (replicas, migrated) = tokio::join!(
                    launch.start_all(replicas),
                    migrate(env, Arc::clone(&prepared), registry, release.clone())
                );
                launched.merge(replicas);
                match migrated {
                    Ok(true) => launched.migrated = true,
                    Ok(false) => {}
                    Err(error) => {
                        launched.error.get_or_insert(error);
                    }
                }
            }
            launched
        };
        let (mut launched, cache) = tokio::join!(database_chain, launch.start_all(others));
        let migrated = launched.migrated;
        launched.merge(cache);
        self.absorb(launched)?;
        if migrated {
            self.registry.migrated.push(self.current_release());
            self.save_registry()?;
        }

        self.abandon_servers_an_interrupted_deploy_was_starting()
            .await?;
        // Group servers from a previous supervisor keep their ids; missing ones are added.
        // The load balancer starts first, with every web server registered: its health checks
        // bring each one UP as soon as it answers, while the others still boot.
        // The groups' members once brought to their counts: a surplus server terminated by a
        // scale-in is not started again (started from a list taken before, it ran with no
        // registry entry: supervised, but in no status, and stopped by the next supervisor).
        self.allocate_group_servers().await?;
        let servers: Vec<ServerRecord> = self
            .registry
            .servers
            .iter()
            .filter(|s| s.group().is_some())
            .cloned()
            .collect();
        self.message = "starting the load balancer, web and worker servers".into();
        self.publish(Phase::Starting, self.message.clone());
        let lb = self.env.lb_record(&self.current_release());
        self.start_server(&lb).await?;
        if self.registry.register_pending {
            self.start_servers(servers).await?;
        } else {
            self.take_over_group_servers(servers).await?;
        }
        self.update_load_balancer().await?;
        self.wait_for_load_balancer().await
    }

    /// Starts the group servers of a running load balancer that a dead supervisor left: web
    /// servers one at a time, each gated on its own health check before the next, workers
    /// alongside. A web server whose configuration changed while no supervisor ran (a
    /// failover cut off before it repointed them) is restarted, and restarting them all at
    /// once would leave the load balancer nobody to send a request to; one at a time, HAProxy
    /// retries a refused connection on another (`option redispatch`, `retry-on
    /// conn-failure`). Web servers adopted whole take a probe each.
    async fn take_over_group_servers(&mut self, servers: Vec<ServerRecord>) -> anyhow::Result<()> {
        let (web, others): (Vec<_>, Vec<_>) =
            servers.into_iter().partition(|s| s.has_role(Role::Web));
        let launch = self.launcher();
        let web_one_at_a_time = async {
            let mut launched = Launched::default();
            for server in web {
                launched.merge(launch.start_all(vec![server]).await);
                if launched.error.is_some() {
                    break;
                }
            }
            launched
        };
        let (mut launched, others) = tokio::join!(web_one_at_a_time, launch.start_all(others));
        launched.merge(others);
        self.absorb(launched)
    }

    /// Servers a deploy cut off (with its supervisor) was still starting, of a release the
    /// group does not run: they never served, and the rollback would replace them anyway, so
    /// they go now (their processes stopped, their files under `terminated/`) rather than be
    /// started again, broken as their release may be.
    async fn abandon_servers_an_interrupted_deploy_was_starting(&mut self) -> anyhow::Result<()> {
        let current = self.current_release();
        let abandoned: Vec<String> = self
            .registry
            .servers
            .iter()
            .filter(|s| {
                s.group().is_some() && s.state == ServerState::Pending && s.release != current
            })
            .map(|s| s.id.clone())
            .collect();
        for id in abandoned {
            tracing::warn!(server = %id, "abandoning a server an interrupted deploy was starting");
            let left: Vec<PidRecord> = {
                let mut leftovers = self.leftovers.lock().expect("leftovers lock");
                let names: Vec<String> = leftovers
                    .keys()
                    .filter(|name| name.split_once('/').is_some_and(|(server, _)| server == id))
                    .cloned()
                    .collect();
                names
                    .iter()
                    .filter_map(|name| leftovers.remove(name))
                    .collect()
            };
            for record in left {
                process::stop(&record, record.stop_signal, Duration::from_secs(30)).await;
            }
            self.terminate_server(&id).await?;
        }
        Ok(())
    }

    /// A deploy interrupted with its supervisor left servers of a release the group does not
    /// run: roll them back to the group's release, health-gated like a deploy.
    async fn roll_back_unfinished_deploy(&mut self) -> anyhow::Result<()> {
        let current = self.current_release();
        if self
            .registry
            .servers
            .iter()
            .any(|s| s.group().is_some() && s.release != current)
        {
            self.message = format!("rolling servers of an unfinished deploy back to {current}");
            self.publish(Phase::Starting, self.message.clone());
            if let Err(failure) = self.finish_on(&current).await {
                bail!("rolling back an unfinished deploy: {failure:#}");
            }
        }
        Ok(())
    }

    fn desired(&self) -> (u32, u32) {
        self.scaled.resolve(self.env.env())
    }

    /// `rigger up` or `rigger scale` on a running environment: re-reads rigger.toml (an
    /// invalid file is ignored, the running configuration stays), adds the stand-alone
    /// servers it now asks for (e.g. a replica), and brings the groups to their counts.
    async fn reconcile(&mut self) -> anyhow::Result<()> {
        match rigger_config::load(&self.env.config_path) {
            Ok(config) => {
                if let Some(env) =
                    LocalEnvironment::new(config, &self.env.name, &self.env.config_path)
                {
                    self.env = Arc::new(env);
                }
            }
            Err(error) => tracing::warn!("keeping the running configuration: {error}"),
        }
        match DesiredCounts::load(&self.env.paths.desired()) {
            Ok(scaled) => self.scaled = scaled,
            Err(error) => tracing::warn!("keeping the running desired counts: {error}"),
        }
        let release = self.current_release();
        let added = self
            .env
            .add_missing_stand_alone_servers(&mut self.registry, &release);
        self.save_registry()?;
        if !added.is_empty() {
            self.publish(
                Phase::Healing,
                format!(
                    "adding {}",
                    added
                        .iter()
                        .map(|s| s.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            // A new replica needs its slot and pg_hba line on the primary before its base backup.
            if let Some(primary) = self
                .registry
                .servers
                .iter()
                .find(|s| s.has_role(Role::DbPrimary) && s.state == ServerState::InService)
                .cloned()
                && added.iter().any(|s| s.has_role(Role::DbReplica))
            {
                self.reapply(&primary.id).await?;
            }
            self.start_servers(added.clone()).await?;
            // App servers' PgBouncers serve a new replica's name from it.
            let app_servers: Vec<String> = self
                .registry
                .servers
                .iter()
                .filter(|s| s.group().is_some())
                .map(|s| s.id.clone())
                .collect();
            for id in app_servers {
                self.reapply(&id).await?;
            }
        }
        self.heal_groups().await
    }

    /// Adds or removes group servers until each group has its desired count.
    async fn reconcile_groups(&mut self) -> anyhow::Result<()> {
        let new = self.allocate_group_servers().await?;
        self.update_load_balancer().await?;
        let launch = self.launcher();
        let launched = launch.start_all(new).await;
        let failed = launched.failed.clone();
        let result = self.absorb(launched);
        // A server that failed to start is terminated; the next heal launches a new one.
        for id in failed {
            self.terminate_server(&id).await?;
        }
        self.update_load_balancer().await?;
        result
    }

    /// Terminates surplus group servers and records (without starting) the missing ones.
    async fn allocate_group_servers(&mut self) -> anyhow::Result<Vec<ServerRecord>> {
        let (web, worker) = self.desired();
        let mut new = Vec::new();
        for (role, desired) in [(Role::Web, web), (Role::Worker, worker)] {
            let members: Vec<ServerRecord> = self.registry.group_members(role).cloned().collect();
            let count = u32::try_from(members.len()).unwrap_or(u32::MAX);
            if count > desired {
                // Scale in: the newest servers go, so the longest-running keep their warm
                // caches and connections.
                let surplus = usize::try_from(count - desired).unwrap_or(0);
                for server in members.iter().rev().take(surplus) {
                    self.terminate_server(&server.id).await?;
                }
            }
            for _ in 0..desired.saturating_sub(count) {
                let mut server = self.registry.new_group_server(
                    role,
                    self.env.local().addresses,
                    &self.current_release(),
                );
                if role == Role::Worker {
                    server.beat = !self.registry.group_members(Role::Worker).any(|w| w.beat);
                }
                self.registry.servers.push(server.clone());
                new.push(server);
            }
        }
        self.save_registry()?;
        Ok(new)
    }

    /// Starts servers in parallel; all must succeed.
    async fn start_servers(&mut self, servers: Vec<ServerRecord>) -> anyhow::Result<()> {
        let launch = self.launcher();
        let outcome = launch.start_all(servers).await;
        self.absorb(outcome)
    }

    fn launcher(&self) -> Launcher {
        Launcher {
            env: Arc::clone(&self.env),
            prepared: self.prepared(),
            registry: self.registry.clone(),
            exits: self.exits_tx.clone(),
            health_gate: (!self.registry.register_pending).then_some(self.health_timeout),
            leftovers: Arc::clone(&self.leftovers),
        }
    }

    /// Takes the services of the servers that started; returns the first failure, if any.
    fn absorb(&mut self, outcome: Launched) -> anyhow::Result<()> {
        for (server, started) in outcome.started {
            for service in started {
                self.services
                    .insert(format!("{}/{}", service.server, service.spec.name), service);
            }
            if let Some(record) = self.registry.get_mut(&server.id) {
                record.state = ServerState::InService;
            }
        }
        self.save_registry()?;
        match outcome.error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    async fn start_server(&mut self, server: &ServerRecord) -> anyhow::Result<()> {
        self.start_servers(vec![server.clone()]).await
    }

    /// Waits until HAProxy reports every in-service web server UP.
    async fn wait_for_load_balancer(&mut self) -> anyhow::Result<()> {
        self.message = "waiting for every web server to be UP behind the load balancer".into();
        self.publish(Phase::Starting, self.message.clone());
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            self.refresh_lb_states().await;
            if self.groups_healthy() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "web servers not UP behind the load balancer after {}s: {:?}",
                    READY_TIMEOUT.as_secs(),
                    self.lb_states
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Why the groups are not healthy, in words, for status.json.
    fn what_is_unhealthy(&self) -> String {
        let not_up: Vec<String> = self
            .registry
            .group_members(Role::Web)
            .filter_map(|s| {
                let state = self
                    .lb_states
                    .get(&s.id)
                    .map_or("not registered", String::as_str);
                (state != "UP").then(|| format!("{} is {state}", s.id))
            })
            .collect();
        if not_up.is_empty() {
            "a group is below its desired count; launching".into()
        } else {
            format!(
                "behind the load balancer: {} (replaced after {} s DOWN)",
                not_up.join(", "),
                LB_DOWN_GRACE.as_secs()
            )
        }
    }

    /// Each group has as many servers as it should (running or starting).
    fn groups_at_desired_count(&self) -> bool {
        let (web, worker) = self.desired();
        self.registry.group_members(Role::Web).count() == web as usize
            && self.registry.group_members(Role::Worker).count() == worker as usize
    }

    /// Every desired group server is in service and every web server UP behind HAProxy.
    fn groups_healthy(&self) -> bool {
        let (web, worker) = self.desired();
        let in_service = |role| {
            self.registry
                .group_members(role)
                .filter(|s| s.state == ServerState::InService)
                .count()
        };
        let webs_up = self
            .registry
            .group_members(Role::Web)
            .all(|s| self.lb_states.get(&s.id).is_some_and(|state| state == "UP"));
        in_service(Role::Web) == web as usize
            && in_service(Role::Worker) == worker as usize
            && webs_up
    }

    async fn refresh_lb_states(&mut self) {
        let socket = self.env.paths.server("lb").join("run/haproxy/haproxy.sock");
        if let Ok(states) = haproxy::server_states(&socket).await {
            self.lb_states = states;
        }
    }

    /// Re-renders HAProxy's configuration with the current web servers and reloads it.
    async fn update_load_balancer(&mut self) -> anyhow::Result<()> {
        let Some(haproxy) = self.services.get("lb/haproxy") else {
            return Ok(()); // not started yet: it will start with the current list
        };
        let record = haproxy.record.clone();
        let prepared = self.prepared();
        let lb = self.env.lb_record(&self.current_release());
        let manifest = ReleaseManifest::load(&self.env.paths, &lb.release)?;
        let ctx = self.env.context(
            &lb,
            &self.registry,
            &prepared.secrets,
            &manifest.venv,
            &manifest.dir(&self.env.paths),
        );
        let recipe = rigger_recipes::render_server(&ctx)?;
        let mut changed = false;
        for file in &recipe.files {
            changed |= apply::ensure_file(file)?;
        }
        if changed {
            process::signal(&record, nix::sys::signal::Signal::SIGUSR2)
                .context("reloading HAProxy")?;
            tracing::info!(
                "load balancer reloaded with {} web servers",
                ctx.peers.web_backends.len()
            );
            // It runs this configuration now: a successor may adopt it as such.
            record_applied(
                &self.env,
                &lb.id,
                (&recipe, &takeover::comparable(&recipe)),
                &ctx.layout.tls_dir,
                self.services.values_mut().filter(|s| s.server == lb.id),
            );
        }
        Ok(())
    }

    /// A service ended: restart it (stand-alone servers) or replace its server (groups).
    async fn handle_exit(&mut self, exit: Exit) -> anyhow::Result<()> {
        let Some(service) = self.services.get(&exit.name) else {
            return Ok(());
        };
        if service.record.pid != exit.pid {
            return Ok(()); // an exit of a process we already replaced or stopped
        }
        let server_id = service.server.clone();
        let Some(server) = self.registry.get(&server_id).cloned() else {
            // The load balancer is not in the registry: restart it in place.
            return self.restart_service(&exit.name).await;
        };
        tracing::warn!(service = %exit.name, pid = exit.pid, "service exited");
        if self
            .operation_servers
            .as_ref()
            .is_some_and(|launched| launched.contains(&server_id))
        {
            // The rollout judges the servers it launched (a dead process fails their batch);
            // what is left of them is healed once it ends.
            self.deferred_exits.push(exit);
            return Ok(());
        }
        if server.group().is_none() || self.operation_servers.is_some() {
            // Stand-alone servers restart in place, and so do group servers while a deploy
            // counts on them until it retires them, or a failover pauses and repoints them (a
            // replacement would start unpaused): systemd's `Restart=always` does the same on
            // AWS servers, whatever a deploy or failover is doing.
            self.message = format!("restarting {}", exit.name);
            self.publish(self.phase, self.message.clone());
            return self.restart_service(&exit.name).await;
        }
        // A group server is replaced, as an Auto Scaling group replaces an unhealthy instance.
        self.replace_server(&server_id, format!("{} exited", exit.name))
            .await
    }

    /// Takes a group server out and lets the group bring a new one (new id, new address).
    async fn replace_server(&mut self, id: &str, reason: String) -> anyhow::Result<()> {
        tracing::warn!(server = %id, %reason, "replacing server");
        self.message = format!("replacing {id}: {reason}");
        self.publish(Phase::Healing, self.message.clone());
        self.terminate_server(id).await?;
        self.heal_groups().await
    }

    /// Brings the groups back to their desired counts, giving up after a few failed launches in
    /// a row (a release that cannot start must not be relaunched forever).
    async fn heal_groups(&mut self) -> anyhow::Result<()> {
        if self.launch_failures >= MAX_LAUNCH_FAILURES {
            return Ok(());
        }
        match self.reconcile_groups().await {
            Ok(()) => {
                self.launch_failures = 0;
                Ok(())
            }
            Err(error) => {
                self.launch_failures += 1;
                if self.launch_failures >= MAX_LAUNCH_FAILURES {
                    return Err(error.context(format!(
                        "{MAX_LAUNCH_FAILURES} launches failed in a row; not trying again until `rigger up`"
                    )));
                }
                Err(error)
            }
        }
    }

    /// Web servers the load balancer has reported DOWN for longer than the grace period are
    /// replaced, as a group with the ELB health check type does with a hung instance.
    async fn replace_servers_down_behind_the_load_balancer(&mut self) -> anyhow::Result<()> {
        let now = tokio::time::Instant::now();
        let in_service: Vec<String> = self
            .registry
            .group_members(Role::Web)
            .filter(|s| s.state == ServerState::InService)
            .map(|s| s.id.clone())
            .collect();
        self.down_since.retain(|id, _| in_service.contains(id));
        let mut expired = Vec::new();
        for id in in_service {
            let down = self
                .lb_states
                .get(&id)
                .is_some_and(|state| state.starts_with("DOWN"));
            if !down {
                self.down_since.remove(&id);
                continue;
            }
            let since = *self.down_since.entry(id.clone()).or_insert(now);
            if now.duration_since(since) > LB_DOWN_GRACE {
                expired.push(id);
            }
        }
        for id in expired {
            self.down_since.remove(&id);
            let reason = format!(
                "DOWN behind the load balancer for over {} s",
                LB_DOWN_GRACE.as_secs()
            );
            self.replace_server(&id, reason).await?;
        }
        Ok(())
    }

    async fn restart_service(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(service) = self.services.remove(name) else {
            return Ok(());
        };
        // Restarting too eagerly would spin on a service that cannot start.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut started = start_service(
            &self.env,
            &service.server,
            &service.spec,
            self.exits_tx.clone(),
        )
        .await?;
        // The same configuration as the one it replaces: as adoptable as that one was.
        if !service.record.config_digest.is_empty()
            && let Err(error) = started
                .record
                .record_config_digest(&service.record.config_digest)
        {
            tracing::warn!(service = %name, "recording its configuration: {error}");
        }
        self.services.insert(name.to_owned(), started);
        Ok(())
    }

    /// Takes a server out of the load balancer, stops its services and forgets it; its logs
    /// stay under `terminated/<id>` for a post-mortem.
    async fn terminate_server(&mut self, id: &str) -> anyhow::Result<()> {
        let services = self.detach_server(id).await?;
        stop_detached(services).await;
        bury(&self.env, id)
    }

    /// Takes a server out of service at once: out of the load balancer and the registry, its
    /// services no longer watched (their exits are not healed). Returns them in the order they
    /// stop, for [`stop_detached`]; until then, a supervisor that dies leaves them to the next
    /// one's clean-up of leftovers under `servers/`.
    async fn detach_server(&mut self, id: &str) -> anyhow::Result<Vec<RunningService>> {
        if let Some(record) = self.registry.get_mut(id) {
            record.state = ServerState::Unhealthy;
        }
        self.update_load_balancer().await?;
        let names: Vec<String> =
            stop_order(self.services.values().filter(|s| s.server == id).collect())
                .into_iter()
                .map(|s| format!("{}/{}", s.server, s.spec.name))
                .collect();
        let services = names
            .iter()
            .filter_map(|name| self.services.remove(name))
            .collect();
        self.registry.remove(id);
        self.save_registry()?;
        Ok(services)
    }

    /// A deploy or database operation begins beside the loop: new web servers get
    /// `health_timeout` to answer their health check, and exits are handled as
    /// [`Supervisor::handle_exit`] says while one runs.
    fn begin_operation(&mut self, health_timeout: Duration) {
        self.health_timeout = health_timeout;
        self.operation_servers = Some(BTreeSet::new());
    }

    /// The operation ended: the usual health timeout, and the exits it left are handled now.
    fn end_operation(&mut self) {
        self.health_timeout = READY_TIMEOUT;
        self.operation_servers = None;
        for exit in std::mem::take(&mut self.deferred_exits) {
            let _ = self.exits_tx.send(exit);
        }
    }

    fn loop_handle(&self) -> rolling::LoopHandle {
        rolling::LoopHandle(self.calls_tx.clone())
    }

    /// Stops everything, the load balancer and app servers first, the databases last.
    async fn stop_all(&mut self) {
        let order = |s: &RunningService| match s.server.as_str() {
            "lb" => 0,
            id if id.starts_with("web-") || id.starts_with("worker-") => 1,
            id if id.starts_with("db-replica") => 3,
            "db-primary" => 4,
            _ => 2,
        };
        let mut services: Vec<RunningService> =
            std::mem::take(&mut self.services).into_values().collect();
        services.sort_by_key(order);
        for level in 0..=4 {
            let batch: Vec<&RunningService> =
                services.iter().filter(|s| order(s) == level).collect();
            // Within a level, each server's services stop in reverse start order.
            let mut by_server: BTreeMap<&str, Vec<&RunningService>> = BTreeMap::new();
            for service in batch {
                by_server.entry(&service.server).or_default().push(service);
            }
            let stops = by_server.into_values().map(|services| async move {
                for service in stop_order(services) {
                    stop_service(service).await;
                }
            });
            for stop in stops {
                stop.await;
            }
        }
        // Anything else recorded under servers/ (e.g. from a half-finished start) goes too.
        process::stop_leftovers(&self.env.paths.servers(), Duration::from_secs(30)).await;
    }

    fn save_registry(&self) -> anyhow::Result<()> {
        self.registry
            .save(&self.env.paths.registry())
            .context("writing registry.json")
    }

    /// Writes status.json.
    fn publish(&mut self, phase: Phase, message: String) {
        self.phase = phase;
        self.message = message;
        let env = &self.env;
        let (web, worker) = self.desired();
        let mut servers: Vec<ServerStatus> = self
            .registry
            .servers
            .iter()
            .map(|server| {
                self.server_status(
                    &server.id,
                    &server.roles,
                    &server.address.to_string(),
                    &server.release,
                    server.state,
                )
            })
            .collect();
        if self.services.keys().any(|name| name.starts_with("lb/")) {
            let lb = env.lb_record(&self.current_release());
            servers.push(self.server_status(
                "lb",
                &lb.roles,
                &lb.address.to_string(),
                &lb.release,
                ServerState::InService,
            ));
        }
        let status = Status {
            schema: "rigger.status".into(),
            version: 1,
            project: env.config.project.name.clone(),
            environment: env.name.clone(),
            provider: "local".into(),
            phase,
            message: self.message.clone(),
            release: self.current_release(),
            urls: vec![env.url(), env.http_url()],
            supervisor_pid: i32::try_from(std::process::id()).ok(),
            supervisor_restarts: None,
            maintenance: self.env.maintenance_on(),
            groups: vec![
                GroupStatus {
                    name: "web".into(),
                    min: env.env().web.min,
                    desired: web,
                    max: env.env().web.max,
                },
                GroupStatus {
                    name: "worker".into(),
                    min: env.env().worker.min,
                    desired: worker,
                    max: env.env().worker.max,
                },
            ],
            servers,
            replication: Vec::new(),
            updated: rigger_engine::clock::unix_now(),
        };
        if let Err(error) = status::save(&status, &env.paths.status()) {
            tracing::error!("writing status.json: {error}");
        }
    }

    fn server_status(
        &self,
        id: &str,
        roles: &[String],
        address: &str,
        release: &str,
        state: ServerState,
    ) -> ServerStatus {
        let processes = self
            .services
            .values()
            .filter(|s| s.server == id)
            .map(|s| ProcessStatus {
                name: s.spec.name.clone(),
                pid: Some(s.record.pid),
                state: if s.record.is_alive() {
                    "running".into()
                } else {
                    "stopped".into()
                },
            })
            .collect();
        let state = match state {
            ServerState::Pending => "pending",
            ServerState::InService => "in_service",
            ServerState::Unhealthy => "unhealthy",
        };
        ServerStatus {
            id: id.to_owned(),
            roles: roles.to_vec(),
            address: address.to_owned(),
            release: release.to_owned(),
            state: state.into(),
            processes,
            load_balancer: roles.iter().any(|r| r == "web").then(|| {
                self.lb_states
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| "not registered".into())
            }),
        }
    }
}

/// Starts servers from a snapshot of the supervisor's state, so that independent chains
/// (cache, databases) can run at once; the supervisor absorbs what started.
struct Launcher {
    env: Arc<LocalEnvironment>,
    prepared: Arc<Prepared>,
    registry: Registry,
    exits: mpsc::UnboundedSender<Exit>,
    /// Web servers must answer their health check directly within this time before they
    /// count as started (and join the load balancer); `None` during a first bring-up.
    health_gate: Option<Duration>,
    leftovers: Leftovers,
}

/// What a [`Launcher`] started, and its first failure.
#[derive(Default)]
struct Launched {
    started: Vec<(ServerRecord, Vec<RunningService>)>,
    /// Ids of the servers that failed to start (their services were stopped).
    failed: Vec<String>,
    error: Option<anyhow::Error>,
    migrated: bool,
}

impl Launched {
    fn merge(&mut self, other: Launched) {
        self.started.extend(other.started);
        self.failed.extend(other.failed);
        if self.error.is_none() {
            self.error = other.error;
        }
        self.migrated |= other.migrated;
    }
}

impl Launcher {
    /// Starts `servers` in parallel.
    async fn start_all(&self, servers: Vec<ServerRecord>) -> Launched {
        let mut tasks = tokio::task::JoinSet::new();
        for server in servers {
            let env = Arc::clone(&self.env);
            let prepared = Arc::clone(&self.prepared);
            let registry = self.registry.clone();
            let exits = self.exits.clone();
            let health_gate = self.health_gate;
            let leftovers = Arc::clone(&self.leftovers);
            tasks.spawn(async move {
                let result = start_server(
                    &env,
                    &prepared,
                    &registry,
                    &server,
                    exits,
                    health_gate,
                    &leftovers,
                )
                .await;
                (server, result)
            });
        }
        let mut launched = Launched::default();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((server, Ok(started))) => launched.started.push((server, started)),
                Ok((server, Err(error))) => {
                    launched.failed.push(server.id.clone());
                    launched.error.get_or_insert(error.context(format!(
                        "starting server {} ({})",
                        server.id, server.address
                    )));
                }
                Err(panic) => {
                    launched
                        .error
                        .get_or_insert(anyhow!("a server start task panicked: {panic}"));
                }
            }
        }
        launched
    }
}

/// Runs the app's migrations (and collectstatic) once per release, before any web server
/// serves it, straight to the primary over TLS verified against the environment's CA.
/// Returns whether it ran (false: this release was already migrated).
async fn migrate(
    env: Arc<LocalEnvironment>,
    prepared: Arc<Prepared>,
    registry: Registry,
    release: String,
) -> anyhow::Result<bool> {
    if registry.migrated.contains(&release) {
        return Ok(false);
    }
    let manifest = ReleaseManifest::load(&env.paths, &release)?;
    let release_dir = manifest.dir(&env.paths);
    let primary = registry
        .servers
        .iter()
        .find(|s| s.has_role(Role::DbPrimary))
        .cloned()
        .context("no database primary")?;
    let worker_like = ServerRecord {
        id: "migrate".into(),
        roles: vec![Role::Worker.as_str().to_owned()],
        ..primary.clone()
    };
    let ctx = env.context(
        &worker_like,
        &registry,
        &prepared.secrets,
        &manifest.venv,
        &release_dir,
    );
    let mut variables = app_environment(&ctx)?;
    for (key, value) in rigger_recipes::primary_direct_env(&ctx) {
        variables.insert(key.into(), value);
    }
    variables.insert("HOME".into(), env.paths.shared().display().to_string());
    // The app's settings hold secrets: they reach manage.py through a 0600 file of the app
    // user's, loaded by the process itself, never as a command's variables (which rigger logs).
    let mut env_text = String::new();
    for (key, value) in &variables {
        env_text.push_str(&rigger_recipes::envfile::line(key, value).with_context(|| {
            format!("the app variable {key} has a control character in its value")
        })?);
    }
    let env_dir = env.paths.root().join("migrate");
    // Root's directory; the app user may only traverse it to read its own file.
    crate::files::create_dir_with_mode(&env_dir, 0o711)?;
    let env_file = env_dir.join("app.env");
    apply::ensure_file(&rigger_recipes::FileSpec {
        path: env_file.clone(),
        contents: env_text,
        mode: 0o600,
        owner: ctx.layout.users.www.clone(),
        contains_secret: true,
    })?;
    let python = manifest.venv.join("bin/python").display().to_string();
    let log = env.paths.root().join("migrate.log");
    for args in [
        &["manage.py", "migrate", "--noinput"][..],
        &["manage.py", "collectstatic", "--noinput", "-v0"],
    ] {
        let command = rigger_recipes::Command::new(python.clone())
            .args(args.iter().copied())
            .cwd(&release_dir)
            .user(ctx.layout.users.www.clone())
            .with_env_file(&env_file);
        apply::run_command(&command, None, &log)
            .await
            .with_context(|| format!("running `manage.py {}` (log: {})", args[1], log.display()))?;
    }
    tracing::info!(%release, "migrations applied");
    Ok(true)
}

/// Renders `server`'s recipe and starts it: files, steps before start, services in
/// dependency order (each probed for readiness), steps after start. On failure, stops what
/// it started.
///
/// A service an earlier supervisor left running (in `leftovers`) is adopted instead when it
/// was started from exactly this configuration ([`config_digest`]): watched and probed, not
/// restarted, so taking over a healthy server fails no request. One left running from
/// anything else is stopped before its replacement starts. A server whose every service is
/// adopted runs no steps: they ran when its services started.
#[allow(clippy::too_many_arguments)]
async fn start_server(
    env: &LocalEnvironment,
    prepared: &Prepared,
    registry: &Registry,
    server: &ServerRecord,
    exits: mpsc::UnboundedSender<Exit>,
    health_gate: Option<Duration>,
    leftovers: &Leftovers,
) -> anyhow::Result<Vec<RunningService>> {
    let manifest = ReleaseManifest::load(&env.paths, &server.release)?;
    let ctx = env.context(
        server,
        registry,
        &prepared.secrets,
        &manifest.venv,
        &manifest.dir(&env.paths),
    );
    let recipe = rigger_recipes::render_server(&ctx)
        .with_context(|| format!("rendering the recipes of {}", server.id))?;
    // Every server that serves TLS: all but a worker (Redis and RabbitMQ too, whose clients
    // check them against the CA as stunnel checks PostgreSQL).
    let needs_certificate = server.roles().iter().any(|r| {
        matches!(
            r,
            Role::Web | Role::Lb | Role::Cache | Role::Queue | Role::DbPrimary | Role::DbReplica
        )
    });
    if needs_certificate {
        let names = env.config.project.domains.clone();
        prepare::ensure_server_certificate(
            &env.paths.pki(),
            &ctx.layout.tls_dir,
            &server.id,
            server.address,
            &names,
            "root",
        )
        .await?;
    }
    let digest = config_digest(&recipe, &ctx.layout.tls_dir);
    let mut adoptable: BTreeMap<String, PidRecord> = BTreeMap::new();
    let mut differing: Vec<(PidRecord, &ServiceSpec)> = Vec::new();
    // A pause deadline left running means a failover paused this app server's PgBouncer and
    // its supervisor died before resuming it (before repointing it, maybe). Its clients wait
    // in the paused pool; once the configuration is applied (in place: see `takeover`), the
    // pool is resumed, as the failover would have.
    let pause_deadline = leftovers
        .lock()
        .expect("leftovers lock")
        .remove(&format!("{}/{}", server.id, PGBOUNCER_RESUME_HELPER));
    // The load balancer's configuration is state, not configuration: it lists the web servers
    // in service, which change while no supervisor runs (a deploy or scale cut off). A
    // running HAProxy is adopted whatever it lists, and reloaded (hitless) once its files are
    // written, as every change of the list reloads it.
    let state_only = server.has_role(Role::Lb);
    let recipe_now = takeover::comparable(&recipe);
    let applied = takeover::applied(&env.paths, &server.id);
    let mut reload: Vec<String> = Vec::new();
    {
        let mut left = leftovers.lock().expect("leftovers lock");
        for spec in &recipe.services {
            let Some(record) = left.remove(&format!("{}/{}", server.id, spec.name)) else {
                continue;
            };
            let decision = takeover::decide(
                &spec.name,
                &record.config_digest,
                &digest,
                applied.as_ref(),
                &recipe_now,
                state_only,
            );
            match decision {
                takeover::Takeover::Restart => differing.push((record, spec)),
                _ if !record.is_alive() => differing.push((record, spec)),
                takeover::Takeover::Adopt => {
                    adoptable.insert(spec.name.clone(), record);
                }
                takeover::Takeover::AdoptAndReload => {
                    reload.push(spec.name.clone());
                    adoptable.insert(spec.name.clone(), record);
                }
            }
        }
    }
    // Stopped in the reverse of their start order: nginx before the app before PgBouncer and
    // stunnel, so the load balancer meets a refused connection (and retries elsewhere), not a
    // web server answering errors.
    let start_order: Vec<&str> = ordered_services(&recipe)?
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    differing.sort_by_key(|(_, spec)| {
        std::cmp::Reverse(start_order.iter().position(|name| *name == spec.name))
    });
    for (record, spec) in differing {
        tracing::info!(service = %record.name, pid = record.pid,
            "restarting a service an earlier supervisor left: its configuration differs");
        process::stop(&record, to_nix(spec.stop_signal), spec.stop_timeout).await;
    }
    // Nothing changed at all (every service adopted, from exactly this configuration): the
    // steps are not run again. Any change runs them, as `reapply` does (a new replica's slot
    // is made by the primary's setup step).
    let every_service_adopted = !recipe.services.is_empty()
        && adoptable.len() == recipe.services.len()
        && adoptable
            .values()
            .all(|record| record.config_digest == digest);
    for dir in &recipe.dirs {
        apply::ensure_dir(dir)?;
    }
    for file in &recipe.files {
        apply::ensure_file(file)?;
    }
    for name in reload {
        let (Some(record), Some(signal)) = (
            adoptable.get(&name),
            recipe
                .services
                .iter()
                .find(|s| s.name == name)
                .and_then(|s| s.reload_signal),
        ) else {
            continue;
        };
        tracing::info!(service = %record.name, "adopted, and reloaded to apply its changed files");
        if let Err(error) = process::signal(record, to_nix(signal)) {
            tracing::warn!(service = %record.name, "reloading an adopted service: {error}");
        }
    }
    let steps_log = ctx.layout.log_dir.join("steps.log");
    if !every_service_adopted {
        run_steps(&recipe, StepPhase::BeforeStart, &steps_log).await?;
    }
    let mut started: Vec<RunningService> = Vec::new();
    for spec in ordered_services(&recipe)? {
        let service = match adoptable.remove(&spec.name) {
            Some(record) => match adopt_service(&server.id, spec, record, exits.clone()).await {
                Ok(adopted) => Ok(adopted),
                // Running but not answering: stopped by the probe's failure, started anew.
                Err(error) => {
                    tracing::warn!(server = %server.id, "restarting an adopted service: {error:#}");
                    start_service(env, &server.id, spec, exits.clone()).await
                }
            },
            None => start_service(env, &server.id, spec, exits.clone()).await,
        };
        match service {
            Ok(service) => started.push(service),
            Err(error) => {
                for service in started.iter().rev() {
                    stop_service(service).await;
                }
                return Err(error);
            }
        }
    }
    if let Some(deadline) = pause_deadline {
        resume_paused_pool(prepared, server, deadline).await;
    }
    let mut result = if every_service_adopted {
        Ok(())
    } else {
        run_steps(&recipe, StepPhase::AfterStart, &steps_log).await
    };
    if let (Ok(()), Some(timeout), true) = (&result, health_gate, server.has_role(Role::Web)) {
        result = health::wait_healthy_directly(env, server, timeout, &started).await;
    }
    if let Err(error) = result {
        for service in started.iter().rev() {
            stop_service(service).await;
        }
        return Err(error);
    }
    // Only a server started whole may be adopted later: a supervisor that dies half-way
    // through a start leaves services a successor restarts.
    record_applied(
        env,
        &server.id,
        (&recipe, &recipe_now),
        &ctx.layout.tls_dir,
        started.iter_mut(),
    );
    tracing::info!(server = %server.id, address = %server.address, "server in service");
    Ok(started)
}

/// The name of an app server's pause deadline ([`crate::pgbouncer::ResumeDeadline`]): its
/// process record `<server>/pgbouncer-resume`, its pid file and log.
const PGBOUNCER_RESUME_HELPER: &str = "pgbouncer-resume";

/// Resumes the PgBouncer a dead supervisor's failover left paused (its configuration now
/// applied), then stops the deadline that would have resumed it. When `RESUME` fails, the
/// deadline stays to resume it when it fires.
async fn resume_paused_pool(prepared: &Prepared, server: &ServerRecord, deadline: PidRecord) {
    let disarm = async {
        process::stop(&deadline, deadline.stop_signal, Duration::from_secs(5)).await;
    };
    if database::resume_pool(prepared, server, Some(disarm))
        .await
        .is_ok()
    {
        tracing::warn!(server = %server.id, "resumed the PgBouncer an interrupted failover had paused");
    }
}

/// Records that `server`'s `services` run `recipe` now (with its TLS files): each one's
/// digest in its pid file, and the recipe (as [`takeover::comparable`] makes it) for
/// [`takeover::decide`]. A successor adopts what runs this configuration and applies in
/// place what differs from it.
fn record_applied<'a>(
    env: &LocalEnvironment,
    server: &str,
    (recipe, comparable): (&Recipe, &serde_json::Value),
    tls_dir: &Path,
    services: impl Iterator<Item = &'a mut RunningService>,
) {
    let digest = config_digest(recipe, tls_dir);
    takeover::record_applied(&env.paths, server, comparable);
    for service in services {
        if let Err(error) = service.record.record_config_digest(&digest) {
            tracing::warn!(service = %service.record.name, "recording its configuration: {error}");
        }
    }
}

/// What a server's services start from, as one digest: its rendered recipe (commands,
/// environments, files, steps; secrets too, which a SHA-256 digest does not reveal) and its
/// TLS files. A service left running with this digest is exactly what a start would make.
fn config_digest(recipe: &Recipe, tls_dir: &Path) -> String {
    use sha2::Digest as _;
    use std::os::unix::ffi::OsStrExt as _;
    let mut hasher = sha2::Sha256::new();
    hasher.update(serde_json::to_vec(recipe).unwrap_or_default());
    let mut files: Vec<PathBuf> = std::fs::read_dir(tls_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    for path in files {
        hasher.update(path.as_os_str().as_bytes());
        hasher.update(std::fs::read(&path).unwrap_or_default());
    }
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

pub(crate) async fn run_steps(recipe: &Recipe, phase: StepPhase, log: &Path) -> anyhow::Result<()> {
    for step in recipe.steps.iter().filter(|s| s.phase == phase) {
        apply::run_step(step, log).await?;
    }
    Ok(())
}

/// Services in an order where each comes after those it depends on.
fn ordered_services(recipe: &Recipe) -> anyhow::Result<Vec<&ServiceSpec>> {
    dependency_order(&recipe.services)
}

/// One server's services in the order they stop: the reverse of their start order, so beat
/// stops before the worker, and the app (a worker's warm shutdown still reaching the database)
/// before PgBouncer and stunnel.
fn stop_order(services: Vec<&RunningService>) -> Vec<&RunningService> {
    let Ok(order) = dependency_order(services.iter().map(|s| &s.spec)) else {
        return services;
    };
    order
        .into_iter()
        .rev()
        .filter_map(|spec| services.iter().copied().find(|s| s.spec.name == spec.name))
        .collect()
}

/// `services` in an order where each comes after those it depends on: the start order; its
/// reverse is the stop order.
fn dependency_order<'a>(
    services: impl IntoIterator<Item = &'a ServiceSpec>,
) -> anyhow::Result<Vec<&'a ServiceSpec>> {
    let mut ordered: Vec<&ServiceSpec> = Vec::new();
    let mut remaining: Vec<&ServiceSpec> = services.into_iter().collect();
    while !remaining.is_empty() {
        let before = remaining.len();
        remaining.retain(|service| {
            let ready = service
                .depends_on
                .iter()
                .all(|d| ordered.iter().any(|o| &o.name == d));
            if ready {
                ordered.push(service);
            }
            !ready
        });
        if remaining.len() == before {
            let names: Vec<&str> = remaining.iter().map(|s| s.name.as_str()).collect();
            return Err(anyhow!(
                "services with unmet or circular dependencies: {}",
                names.join(", ")
            ));
        }
    }
    Ok(ordered)
}

/// The app's environment as rendered for this server (docs/app-contract.md).
fn app_environment(
    ctx: &rigger_recipes::ServerContext,
) -> anyhow::Result<BTreeMap<String, String>> {
    let recipe = rigger_recipes::render_server(ctx)?;
    let env_file = recipe
        .services
        .iter()
        .find_map(|s| s.env_file.clone())
        .context("the worker recipe renders an app environment file")?;
    let file = recipe
        .file(&env_file)
        .context("the app environment file is rendered")?;
    Ok(rigger_recipes::envfile::parse(&file.contents)?)
}

async fn start_service(
    env: &LocalEnvironment,
    server: &str,
    spec: &ServiceSpec,
    exits: mpsc::UnboundedSender<Exit>,
) -> anyhow::Result<RunningService> {
    let name = format!("{server}/{}", spec.name);
    let process_env = service_environment(spec)?;
    let process_spec = ProcessSpec {
        name: name.clone(),
        program: PathBuf::from(&spec.command.program),
        args: spec.command.args.clone(),
        env: process_env,
        cwd: spec.command.cwd.clone(),
        user: Some(spec.user.clone()),
        log_path: spec.log_file.clone(),
        pid_path: env
            .paths
            .server(server)
            .join("pids")
            .join(format!("{}.pid", spec.name)),
        stop_signal: to_nix(spec.stop_signal),
        stop_timeout: spec.stop_timeout,
    };
    let mut supervised = process::spawn(&process_spec)
        .await
        .with_context(|| format!("starting {name}"))?;
    let record = supervised.record();
    let alive = Arc::new(AtomicBool::new(true));
    let watcher_alive = Arc::clone(&alive);
    let pid = record.pid;
    let watcher_name = name.clone();
    tokio::spawn(async move {
        let _ = supervised.wait().await;
        watcher_alive.store(false, Ordering::SeqCst);
        let _ = exits.send(Exit {
            name: watcher_name,
            pid,
        });
    });
    let service = RunningService {
        server: server.to_owned(),
        spec: spec.clone(),
        record,
    };
    wait_service_ready(service, &process_spec.env, &alive, READY_TIMEOUT).await
}

/// Takes over `record`, a service an earlier supervisor started from this very
/// configuration and left running: its exit is watched like a child's, and it must pass its
/// readiness probe (at once, when healthy) as a started one must.
async fn adopt_service(
    server: &str,
    spec: &ServiceSpec,
    record: PidRecord,
    exits: mpsc::UnboundedSender<Exit>,
) -> anyhow::Result<RunningService> {
    let process_env = service_environment(spec)?;
    let alive = Arc::new(AtomicBool::new(true));
    let watcher_alive = Arc::clone(&alive);
    let (name, pid) = (record.name.clone(), record.pid);
    let watched = record.clone();
    tokio::spawn(async move {
        if let Err(error) = process::wait_for_exit(&watched).await {
            // Without a pidfd its exit would go unseen: treat it as gone, so it is restarted.
            tracing::error!(service = %watched.name, "watching an adopted process: {error}");
        }
        watcher_alive.store(false, Ordering::SeqCst);
        let _ = exits.send(Exit { name, pid });
    });
    tracing::info!(service = %record.name, pid, "adopted");
    let service = RunningService {
        server: server.to_owned(),
        spec: spec.clone(),
        record,
    };
    wait_service_ready(service, &process_env, &alive, ADOPTED_READY_TIMEOUT).await
}

/// The whole environment a service runs with: its command's, and its environment file's.
fn service_environment(spec: &ServiceSpec) -> anyhow::Result<BTreeMap<String, String>> {
    let mut process_env = spec.command.env.clone();
    if let Some(env_file) = &spec.env_file {
        let text = std::fs::read_to_string(env_file)
            .with_context(|| format!("reading {}", env_file.display()))?;
        process_env.extend(rigger_recipes::envfile::parse(&text)?);
    }
    Ok(process_env)
}

/// Waits for `service`'s readiness probe, if it has one; stops it when it does not pass.
async fn wait_service_ready(
    service: RunningService,
    process_env: &BTreeMap<String, String>,
    alive: &AtomicBool,
    timeout: Duration,
) -> anyhow::Result<RunningService> {
    let spec = &service.spec;
    let name = service.record.name.clone();
    let pid = service.record.pid;
    if let Some(probe) = to_probe(spec, process_env) {
        let waited = probe::wait_ready(
            &probe,
            timeout,
            || alive.load(Ordering::SeqCst),
            Some(&spec.log_file),
        )
        .await;
        if let Err(error) = waited {
            stop_service(&service).await;
            return Err(anyhow::Error::new(error).context(format!("{name} did not become ready")));
        }
    }
    tracing::debug!(service = %name, pid, "ready");
    Ok(service)
}

async fn stop_service(service: &RunningService) {
    let outcome = process::stop(
        &service.record,
        to_nix(service.spec.stop_signal),
        service.spec.stop_timeout,
    )
    .await;
    tracing::debug!(service = %service.spec.name, server = %service.server, ?outcome, "stopped");
}

/// Stops the services of a detached server, in the order given.
async fn stop_detached(services: Vec<RunningService>) {
    for service in &services {
        stop_service(service).await;
    }
}

/// A terminated server's directory moves to `terminated/<id>`: its logs and settings stay for
/// a post-mortem, readable by root only.
fn bury(env: &LocalEnvironment, id: &str) -> anyhow::Result<()> {
    let dir = env.paths.server(id);
    if dir.exists() {
        let graveyard = env.paths.root().join("terminated");
        crate::files::create_private_dir(&graveyard)?;
        let _ = std::fs::remove_dir_all(graveyard.join(id));
        std::fs::rename(&dir, graveyard.join(id))?;
    }
    Ok(())
}

pub(crate) fn to_nix(signal: rigger_recipes::Signal) -> nix::sys::signal::Signal {
    use nix::sys::signal::Signal as N;
    use rigger_recipes::Signal as S;
    match signal {
        S::Term => N::SIGTERM,
        S::Int => N::SIGINT,
        S::Quit => N::SIGQUIT,
        S::Hup => N::SIGHUP,
        S::Usr1 => N::SIGUSR1,
        S::Usr2 => N::SIGUSR2,
    }
}

/// The probe of `spec`. A command probe runs like its service: in its directory, with its
/// environment (e.g. `celery inspect ping` needs the app's settings).
fn to_probe(spec: &ServiceSpec, service_env: &BTreeMap<String, String>) -> Option<Probe> {
    Some(match &spec.readiness {
        RecipeProbe::Tcp { addr, port } => Probe::Tcp {
            addr: (*addr).into(),
            port: *port,
        },
        // A TLS handshake needs a TCP connection first; the accepted connection is the signal.
        RecipeProbe::Tls { addr, port, .. } => Probe::Tcp {
            addr: (*addr).into(),
            port: *port,
        },
        RecipeProbe::Https {
            addr,
            port,
            host,
            path,
            expect_status,
            ..
        } => Probe::Https {
            addr: (*addr).into(),
            port: *port,
            path: path.clone(),
            host: host.clone(),
            expect_status: *expect_status,
        },
        RecipeProbe::Command(command) => {
            let mut env = service_env.clone();
            env.extend(command.env.clone());
            Probe::Command {
                program: PathBuf::from(&command.program),
                args: command.args.clone(),
                env,
                user: command.user.clone(),
                cwd: command.cwd.clone().or_else(|| spec.command.cwd.clone()),
            }
        }
        RecipeProbe::Running => return None,
    })
}

/// The id of the last request answered, from the outcome on disk: a restarted supervisor
/// must not redo it. A damaged outcome is said in the log and the request on disk (if
/// readable) taken as answered: whether it ended is unknown, and running it again, or
/// recording it `interrupted` a second time, is worse than doing nothing.
fn last_answered(
    outcome: std::io::Result<Option<String>>,
    request: std::io::Result<Option<String>>,
) -> Option<String> {
    match outcome {
        Ok(answered) => answered,
        Err(error) => {
            tracing::error!("{error}");
            request.ok().flatten()
        }
    }
}

/// The request id of the last deploy outcome on disk: a restarted supervisor must not redo it.
fn deploy_outcome_request(paths: &crate::paths::EnvPaths) -> Option<String> {
    last_answered(
        crate::deploy::read_outcome(paths).map(|o| o.map(|o| o.request)),
        crate::deploy::read_request(paths).map(|r| r.map(|r| r.id)),
    )
}
