//! The supervisor's side of a deploy: migrations once, then the engine's rollout
//! ([`rigger_engine::rollout`]: web servers in health-gated batches, then workers, rolled back
//! to the previous release when a batch fails) with the supervisor's servers as its
//! [`RolloutTarget`]: a new server is started on the release and registered with HAProxy at
//! once, observed through HAProxy's checks (web) or its processes (worker), and an old one
//! retires by being drained from HAProxy (web) or by Celery's warm shutdown (worker).
//!
//! A rollout runs *beside* the supervisor's event loop, not inside it: the loop owns the
//! servers, and the rollout asks it for each step that reads or changes them (a [`Call`]
//! through [`LoopHandle`]), which the loop runs whole between its own work. Everything that
//! waits (a server starting and answering its health check, the gate's polling, draining, a
//! warm shutdown) waits in the rollout, so the loop keeps healing what the rollout does not
//! own and answers SIGTERM at once while a deploy runs.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use rigger_engine::rollout::{
    self, Launched, Observation, RolloutOutcome, RolloutSettings, RolloutTarget,
};
use rigger_recipes::Role;
use tokio::sync::{mpsc, oneshot};

use super::{Launcher, RunningService, Supervisor, migrate};
use crate::deploy::{self, DeployOutcome, DeployRequest};
use crate::environment::LocalEnvironment;
use crate::haproxy;
use crate::process;
use crate::registry::ServerRecord;
use crate::release::{self, DeployRecord, ReleaseManifest};
use crate::status::Phase;

/// A step a rollout asks the supervisor's loop to run on its servers.
pub(super) type Call =
    Box<dyn for<'a> FnOnce(&'a mut Supervisor) -> Pin<Box<dyn Future<Output = ()> + 'a>> + Send>;

/// A rollout running beside the loop, as the loop holds it until it ends.
pub(super) type RolloutFlow = Pin<Box<dyn Future<Output = Result<(), (&'static str, String)>>>>;

/// How a rollout reaches the supervisor's loop.
#[derive(Clone)]
pub(super) struct LoopHandle(pub(super) mpsc::UnboundedSender<Call>);

impl LoopHandle {
    /// Runs `step` on the supervisor between the loop's own work, and returns its result.
    pub(super) async fn call<T: Send + 'static>(
        &self,
        step: impl AsyncFnOnce(&mut Supervisor) -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let (reply, answer) = oneshot::channel();
        let call: Call = Box::new(move |supervisor| {
            Box::pin(async move {
                // The rollout may be gone (the supervisor stopping): nobody to answer.
                let _ = reply.send(step(supervisor).await);
            })
        });
        let stopped = || anyhow!("the supervisor stopped during the rollout");
        self.0.send(call).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())
    }

    /// Publishes a step's progress, without waiting for it.
    fn say(&self, message: String) {
        let _ = self.0.send(Box::new(move |supervisor| {
            Box::pin(async move { supervisor.say(message) })
        }));
    }
}

/// When a deploy began: for its duration, and its record's start.
#[derive(Debug, Clone, Copy)]
pub(super) struct DeployStarted {
    at: Instant,
    unix: u64,
}

impl DeployStarted {
    pub(super) fn now() -> DeployStarted {
        DeployStarted {
            at: Instant::now(),
            unix: rigger_engine::clock::unix_now(),
        }
    }

    /// A deploy an earlier supervisor began at `unix` (its duration is then this one's).
    pub(super) fn earlier(unix: u64) -> DeployStarted {
        DeployStarted {
            at: Instant::now(),
            unix,
        }
    }

    pub(super) fn unix(&self) -> u64 {
        self.unix
    }
}

/// How often the gate reads HAProxy's view: a local socket, cheap to ask.
const POLL: Duration = Duration::from_millis(250);

/// For rolling back an unfinished deploy at start-up: the CLI's defaults.
pub(super) fn default_settings() -> RolloutSettings {
    RolloutSettings {
        poll: POLL,
        ..RolloutSettings::default()
    }
}

impl Supervisor {
    /// A request file's content: a damaged one is said in the log and set aside as
    /// `<name>.damaged`, so that the CLI waiting for its answer stops and says so (it watches
    /// its request) instead of waiting for ever.
    pub(super) fn readable_request<T>(
        &self,
        read: std::io::Result<Option<T>>,
        path: &std::path::Path,
    ) -> Option<T> {
        match read {
            Ok(request) => request,
            Err(error) => {
                tracing::error!("{error}");
                let aside = crate::files::damaged_path(path);
                if let Err(error) = std::fs::rename(path, &aside) {
                    tracing::error!("setting {} aside: {error}", path.display());
                }
                None
            }
        }
    }

    /// The deploy request in `deploy/request.json` (SIGUSR1), once: `None` when there is none
    /// or it was handled already.
    pub(super) fn take_deploy_request(&mut self) -> Option<DeployRequest> {
        let request = self.readable_request(
            deploy::read_request(&self.env.paths),
            &deploy::request_path(&self.env.paths),
        )?;
        if self.last_deploy_request.as_deref() == Some(request.id.as_str()) {
            return None;
        }
        self.last_deploy_request = Some(request.id.clone());
        Some(request)
    }

    /// A deploy the previous supervisor began and never ended (it was killed: a SIGTERM
    /// records its outcome): recorded `interrupted` now, before start-up rolls back what it
    /// left, so that `rigger releases` and the CLI that waited for it both know.
    pub(super) fn record_deploy_left_by_a_dead_supervisor(&mut self) {
        let Some(request) = self.readable_request(
            deploy::read_request(&self.env.paths),
            &deploy::request_path(&self.env.paths),
        ) else {
            return;
        };
        let Some(started) = deploy::Begun::unanswered(
            deploy::read_begun(&self.env.paths),
            &request.id,
            self.last_deploy_request.as_deref(),
        ) else {
            return;
        };
        self.last_deploy_request = Some(request.id.clone());
        let started = DeployStarted::earlier(started);
        let why = "the supervisor died during the deploy; its next start rolled back the \
                   servers it had replaced";
        self.record_deploy(&request, started, Err(("interrupted", why.into())));
    }

    /// Records how a deploy ended: in the history (`releases.jsonl`), in the outcome the CLI
    /// waits for, and in the status.
    pub(super) fn record_deploy(
        &mut self,
        request: &DeployRequest,
        started: DeployStarted,
        ended: Result<(), (&'static str, String)>,
    ) {
        let (result, reason) = match ended {
            Ok(()) => ("succeeded", String::new()),
            Err((result, reason)) => (result, reason),
        };
        let outcome = DeployOutcome {
            request: request.id.clone(),
            release: request.release.clone(),
            result: result.into(),
            reason: reason.clone(),
            duration_secs: started.at.elapsed().as_secs_f64(),
        };
        let revision = ReleaseManifest::load(&self.env.paths, &request.release)
            .map(|m| m.revision)
            .unwrap_or_default();
        let record = DeployRecord {
            release: request.release.clone(),
            revision,
            by: request.requested_by.clone(),
            started: started.unix,
            finished: rigger_engine::clock::unix_now(),
            result: result.into(),
            reason,
        };
        if let Err(error) = release::append_history(&self.env.paths, &record) {
            tracing::error!("recording the deploy in releases.jsonl: {error:#}");
        }
        if let Err(error) = deploy::write_outcome(&self.env.paths, &outcome) {
            tracing::error!("writing the deploy outcome: {error:#}");
        }
        let message = format!("deploy of {} {result}", request.release);
        self.publish(
            if result == "succeeded" {
                Phase::Ready
            } else {
                Phase::Healing
            },
            message,
        );
    }

    /// Starts a deploy beside the loop: the flow runs the release's migrations, then the
    /// rollout; it ends `Err((result, reason))` with result `rolled back` or `failed`. The
    /// loop polls it, serves its calls, and calls [`Supervisor::end_operation`] when it ends.
    pub(super) fn start_deploy(&mut self, request: &DeployRequest) -> RolloutFlow {
        let failed = |reason: String| ("failed", reason);
        let release = request.release.clone();
        let batch = ReleaseManifest::load(&self.env.paths, &release)
            .map_err(|e| failed(format!("{e:#}")))
            .and_then(|_| request.batch.parse().map_err(failed));
        let batch = match batch {
            Ok(batch) => batch,
            Err(refused) => return Box::pin(std::future::ready(Err(refused))),
        };
        let settings = RolloutSettings {
            batch,
            health_timeout: Duration::from_secs(request.health_timeout_secs),
            drain_timeout: Duration::from_secs(request.drain_timeout_secs),
            worker_stop_timeout: Duration::from_secs(request.worker_stop_timeout_secs),
            ..default_settings()
        };
        let previous = self.current_release();
        self.begin_operation(settings.health_timeout);
        Box::pin(deploy_release(
            self.loop_handle(),
            Arc::clone(&self.env),
            self.prepared(),
            self.registry.clone(),
            release,
            previous,
            settings,
        ))
    }

    /// Puts every group server on `release` with nothing to fall back to (an unfinished
    /// deploy at start-up, before the loop runs); `Err` says why a batch failed.
    pub(super) async fn finish_on(&mut self, release: &str) -> anyhow::Result<()> {
        self.begin_operation(self.health_timeout);
        let mut servers = LoopServers {
            link: self.loop_handle(),
            env: Arc::clone(&self.env),
        };
        let release = release.to_owned();
        let finished = self
            .serve_until(Box::pin(async move {
                rollout::finish_on(&mut servers, &release, &default_settings()).await
            }))
            .await;
        self.end_operation();
        match finished? {
            Ok(()) => Ok(()),
            Err(why) => Err(anyhow!(why)),
        }
    }

    /// Serves a rollout's calls, and nothing else, until it ends.
    async fn serve_until<T>(&mut self, mut flow: Pin<Box<dyn Future<Output = T>>>) -> T {
        loop {
            tokio::select! {
                ended = flow.as_mut() => return ended,
                Some(call) = self.calls_rx.recv() => call(self).await,
            }
        }
    }

    /// Records one new server of `role` on `release` per server in `replacing`, registered
    /// with the load balancer at once so that its checks start; returns them with the
    /// launcher that starts them (beside the loop: starting includes the health check). A new
    /// worker takes over Celery beat from the one it replaces.
    async fn register_new_servers(
        &mut self,
        role: Role,
        release: &str,
        replacing: &[String],
    ) -> anyhow::Result<(Vec<ServerRecord>, Launcher)> {
        let mut new = Vec::new();
        for old in replacing {
            let mut server =
                self.registry
                    .new_group_server(role, self.env.local().addresses, release);
            server.beat = self.registry.get(old).is_some_and(|s| s.beat);
            self.registry.servers.push(server.clone());
            if let Some(launched) = &mut self.operation_servers {
                launched.insert(server.id.clone());
            }
            new.push(server);
        }
        self.save_registry()?;
        self.update_load_balancer().await?;
        Ok((new, self.launcher()))
    }

    /// Takes over the services of a batch that started; `Err` says why it did not.
    async fn take_started(
        &mut self,
        started: super::Launched,
    ) -> anyhow::Result<Result<(), String>> {
        if let Err(error) = self.absorb(started) {
            return Ok(Err(format!("{error:#}")));
        }
        self.update_load_balancer().await?;
        Ok(Ok(()))
    }

    /// New servers as the gate sees them: web servers by HAProxy's checks, workers by their
    /// processes; any server with a process that exited fails at once.
    async fn observe(&mut self, role: Role, servers: &[String]) -> Observation {
        if role == Role::Web {
            self.refresh_lb_states().await;
        }
        let mut observation = Observation::default();
        for id in servers {
            let dead = self
                .services
                .values()
                .any(|s| &s.server == id && !s.record.is_alive());
            if dead {
                observation
                    .failed
                    .insert(id.clone(), "a process of the server exited".to_owned());
            }
            let state = match role {
                Role::Web => self.lb_states.get(id).cloned(),
                _ if !dead => Some("UP".to_owned()),
                _ => None,
            };
            if let Some(state) = state {
                observation.states.insert(id.clone(), state);
            }
        }
        observation
    }

    /// The evidence: the load balancer's last check and the health probe's answer (web
    /// servers), the app's log.
    async fn explain(&self, role: Role, servers: &[String]) -> String {
        let socket = self.env.paths.server("lb").join("run/haproxy/haproxy.sock");
        let stats = if role == Role::Web {
            haproxy::stats(&socket).await.unwrap_or_default()
        } else {
            BTreeMap::new()
        };
        let mut evidence = Vec::new();
        for id in servers {
            if let Some(stat) = stats.get(id) {
                evidence.push(format!(
                    "  {id}: the load balancer's last check: {} {}: {}",
                    stat.check_status, stat.check_code, stat.check_detail
                ));
            }
            if role == Role::Web
                && let Some(server) = self.registry.get(id)
            {
                evidence.push(format!("  {id}: {}", self.probe_health(server).await));
            }
            let log = self.app_log_tail(id);
            if !log.is_empty() {
                evidence.push(log.trim_start_matches('\n').to_owned());
            }
        }
        evidence.join("\n")
    }

    /// GET the health path straight from the server's nginx, as the load balancer does.
    async fn probe_health(&self, server: &ServerRecord) -> String {
        match super::health::probe(&self.env, server).await {
            Ok((code, body)) => format!(
                "GET {} answered {code}: {body:?}",
                self.env.config.project.health_check_path
            ),
            Err(why) => format!("GET {} {why}", self.env.config.project.health_check_path),
        }
    }

    /// The last lines of the app's log on a server (gunicorn or Celery), indented.
    fn app_log_tail(&self, server: &str) -> String {
        let log = ["gunicorn", "celery-worker"].iter().find_map(|service| {
            self.services
                .get(&format!("{server}/{service}"))
                .map(|s| s.spec.log_file.clone())
        });
        let log = log.unwrap_or_else(|| self.env.paths.server(server).join("log/gunicorn.log"));
        let lines = process::log_tail(&log, 15);
        if lines.is_empty() {
            return String::new();
        }
        format!(
            "\n  last lines of {}:\n    {}",
            log.display(),
            lines.join("\n    ")
        )
    }

    pub(super) fn say(&mut self, message: String) {
        tracing::info!("{message}");
        self.publish(Phase::Deploying, message);
    }
}

/// A deploy's flow beside the loop: migrations once, before any server switches (a failure
/// switches nothing), then the rollout.
async fn deploy_release(
    link: LoopHandle,
    env: Arc<LocalEnvironment>,
    prepared: Arc<super::Prepared>,
    registry: crate::registry::Registry,
    release: String,
    previous: String,
    settings: RolloutSettings,
) -> Result<(), (&'static str, String)> {
    let failed = |error: anyhow::Error| ("failed", format!("{error:#}"));
    link.say(format!("deploy {release}: running migrations"));
    match migrate(Arc::clone(&env), prepared, registry, release.clone()).await {
        Ok(true) => {
            let migrated = release.clone();
            link.call(async move |supervisor: &mut Supervisor| {
                supervisor.registry.migrated.push(migrated);
                supervisor.save_registry()
            })
            .await
            .and_then(|saved| saved)
            .map_err(failed)?;
        }
        Ok(false) => {}
        Err(error) => {
            return Err((
                "failed",
                format!("migrations failed, nothing was switched: {error:#}"),
            ));
        }
    }

    let mut servers = LoopServers {
        link: link.clone(),
        env,
    };
    let outcome = rollout::roll_out(&mut servers, &release, &previous, &settings)
        .await
        .map_err(failed)?;
    match outcome {
        RolloutOutcome::Completed => {
            let deployed = release.clone();
            link.call(async move |supervisor: &mut Supervisor| {
                supervisor.registry.current_release = Some(deployed);
                supervisor.save_registry()
            })
            .await
            .and_then(|saved| saved)
            .map_err(failed)?;
            link.say(format!("deploy {release}: every server runs it"));
            Ok(())
        }
        RolloutOutcome::RolledBack { reason } => Err(("rolled back", reason)),
        RolloutOutcome::RollbackFailed { reason, rollback } => Err((
            "failed",
            format!("{reason}; then rolling back to {previous} failed too: {rollback}"),
        )),
    }
}

/// Stops sending requests to a web server and waits (bounded) for those in progress.
async fn drain(env: &LocalEnvironment, id: &str, timeout: Duration) {
    let socket = env.paths.server("lb").join("run/haproxy/haproxy.sock");
    if let Err(error) = haproxy::drain(&socket, id).await {
        tracing::warn!(server = %id, "draining: {error}");
        return;
    }
    let started = Instant::now();
    while started.elapsed() < timeout {
        match haproxy::stats(&socket).await {
            Ok(stats) if stats.get(id).is_none_or(|s| s.current_sessions == 0) => return,
            Ok(_) => {}
            Err(_) => return,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::warn!(server = %id, "still busy after {} s of draining; stopping it anyway", timeout.as_secs());
}

/// The supervisor's group servers as the engine's rollout drives them, from beside the loop.
struct LoopServers {
    link: LoopHandle,
    env: Arc<LocalEnvironment>,
}

impl LoopServers {
    /// Takes a server out of service through the loop at once, then stops its processes
    /// here, where waiting (a warm shutdown may take minutes) holds up nothing else; a
    /// worker's Celery gets `worker_stop_timeout` for its running tasks.
    async fn remove(&self, id: &str, worker_stop_timeout: Option<Duration>) -> anyhow::Result<()> {
        let server = id.to_owned();
        let mut services: Vec<RunningService> = self
            .link
            .call(async move |supervisor: &mut Supervisor| supervisor.detach_server(&server).await)
            .await??;
        if let Some(timeout) = worker_stop_timeout {
            for service in &mut services {
                if service.spec.name == "celery-worker" {
                    service.spec.stop_timeout = timeout;
                }
            }
        }
        super::stop_detached(services).await;
        super::bury(&self.env, id)
    }
}

impl RolloutTarget for LoopServers {
    type Error = anyhow::Error;

    fn has_group(&self, role: Role) -> bool {
        matches!(role, Role::Web | Role::Worker)
    }

    async fn outdated(&mut self, role: Role, release: &str) -> anyhow::Result<Vec<String>> {
        let release = release.to_owned();
        self.link
            .call(async move |supervisor: &mut Supervisor| {
                supervisor
                    .registry
                    .group_members(role)
                    .filter(|s| s.release != release)
                    .map(|s| s.id.clone())
                    .collect()
            })
            .await
    }

    /// Nothing to point: a local server is started on the release it is given.
    async fn begin(&mut self, _role: Role, _release: &str, _surge: usize) -> anyhow::Result<()> {
        Ok(())
    }

    async fn launch(
        &mut self,
        role: Role,
        release: &str,
        replacing: &[String],
    ) -> anyhow::Result<Launched> {
        let (release, replacing) = (release.to_owned(), replacing.to_vec());
        let (new, launcher) = self
            .link
            .call(async move |supervisor: &mut Supervisor| {
                supervisor
                    .register_new_servers(role, &release, &replacing)
                    .await
            })
            .await??;
        let ids: Vec<String> = new.iter().map(|s| s.id.clone()).collect();
        let started = launcher.start_all(new).await;
        let taken = self
            .link
            .call(async move |supervisor: &mut Supervisor| supervisor.take_started(started).await)
            .await??;
        Ok(match taken {
            Ok(()) => Launched::Servers(ids),
            Err(why) => Launched::Failed { servers: ids, why },
        })
    }

    async fn observe(&mut self, role: Role, servers: &[String]) -> anyhow::Result<Observation> {
        let servers = servers.to_vec();
        self.link
            .call(async move |supervisor: &mut Supervisor| supervisor.observe(role, &servers).await)
            .await
    }

    async fn explain(&mut self, role: Role, servers: &[String]) -> String {
        let servers = servers.to_vec();
        self.link
            .call(async move |supervisor: &mut Supervisor| supervisor.explain(role, &servers).await)
            .await
            .unwrap_or_else(|error| format!("{error:#}"))
    }

    async fn discard(&mut self, _role: Role, servers: &[String]) -> anyhow::Result<()> {
        for id in servers {
            if let Err(error) = self.remove(id, None).await {
                tracing::error!("{error:#}");
            }
        }
        Ok(())
    }

    async fn retire(
        &mut self,
        role: Role,
        servers: &[String],
        settings: &RolloutSettings,
    ) -> anyhow::Result<()> {
        for id in servers {
            let worker_stop_timeout = match role {
                Role::Web => {
                    drain(&self.env, id, settings.drain_timeout).await;
                    None
                }
                _ => {
                    self.link.say(format!(
                        "{id}: warm shutdown of Celery (up to {} s for running tasks)",
                        settings.worker_stop_timeout.as_secs()
                    ));
                    Some(settings.worker_stop_timeout)
                }
            };
            if let Err(error) = self.remove(id, worker_stop_timeout).await {
                tracing::error!("{error:#}");
            }
        }
        Ok(())
    }

    async fn end(&mut self, _role: Role) -> anyhow::Result<()> {
        Ok(())
    }

    fn report(&mut self, message: &str) {
        self.link.say(message.to_owned());
    }
}
