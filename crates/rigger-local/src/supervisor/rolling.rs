//! The supervisor's side of a deploy: migrations once, then the engine's rollout
//! ([`rigger_engine::rollout`]: web servers in health-gated batches, then workers, rolled back
//! to the previous release when a batch fails) with the supervisor's servers as its
//! [`RolloutTarget`]: a new server is started on the release and registered with HAProxy at
//! once, observed through HAProxy's checks (web) or its processes (worker), and an old one
//! retires by being drained from HAProxy (web) or by Celery's warm shutdown (worker).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rigger_engine::rollout::{
    self, Launched, Observation, RolloutOutcome, RolloutSettings, RolloutTarget,
};
use rigger_recipes::Role;

use super::{Supervisor, migrate};
use crate::deploy::{self, DeployOutcome, DeployRequest};
use crate::haproxy;
use crate::process;
use crate::registry::ServerRecord;
use crate::release::{self, DeployRecord, ReleaseManifest};
use crate::status::Phase;

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
    /// The deploy request in `deploy/request.json` (SIGUSR1), once: `None` when there is none
    /// or it was handled already.
    pub(super) fn take_deploy_request(&mut self) -> Option<DeployRequest> {
        let request = deploy::read_request(&self.env.paths)?;
        if self.last_deploy_request.as_deref() == Some(request.id.as_str()) {
            return None;
        }
        self.last_deploy_request = Some(request.id.clone());
        Some(request)
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

    /// The whole deploy. `Err((result, reason))` with result `rolled back` or `failed`.
    pub(super) async fn deploy(
        &mut self,
        request: &DeployRequest,
    ) -> Result<(), (&'static str, String)> {
        let failed = |reason: String| ("failed", reason);
        let release = request.release.clone();
        ReleaseManifest::load(&self.env.paths, &release).map_err(|e| failed(format!("{e:#}")))?;
        let settings = RolloutSettings {
            batch: request.batch.parse().map_err(failed)?,
            health_timeout: Duration::from_secs(request.health_timeout_secs),
            drain_timeout: Duration::from_secs(request.drain_timeout_secs),
            worker_stop_timeout: Duration::from_secs(request.worker_stop_timeout_secs),
            ..default_settings()
        };
        let previous = self.current_release();
        let usual_timeout = std::mem::replace(&mut self.health_timeout, settings.health_timeout);
        let result = self.deploy_release(release, previous, settings).await;
        self.health_timeout = usual_timeout;
        result
    }

    async fn deploy_release(
        &mut self,
        release: String,
        previous: String,
        settings: RolloutSettings,
    ) -> Result<(), (&'static str, String)> {
        let failed = |reason: String| ("failed", reason);

        // Migrations once, before any server switches; a failure switches nothing.
        self.say(format!("deploy {release}: running migrations"));
        match migrate(
            std::sync::Arc::clone(&self.env),
            self.prepared(),
            self.registry.clone(),
            release.clone(),
        )
        .await
        {
            Ok(true) => {
                self.registry.migrated.push(release.clone());
                self.save_registry().map_err(|e| failed(format!("{e:#}")))?;
            }
            Ok(false) => {}
            Err(error) => {
                return Err(failed(format!(
                    "migrations failed, nothing was switched: {error:#}"
                )));
            }
        }

        let outcome = rollout::roll_out(&mut Servers(self), &release, &previous, &settings)
            .await
            .map_err(|e| failed(format!("{e:#}")))?;
        match outcome {
            RolloutOutcome::Completed => {
                self.registry.current_release = Some(release.clone());
                self.save_registry().map_err(|e| failed(format!("{e:#}")))?;
                self.say(format!("deploy {release}: every server runs it"));
                Ok(())
            }
            RolloutOutcome::RolledBack { reason } => Err(("rolled back", reason)),
            RolloutOutcome::RollbackFailed { reason, rollback } => Err(failed(format!(
                "{reason}; then rolling back to {previous} failed too: {rollback}"
            ))),
        }
    }

    /// Puts every group server on `release` with nothing to fall back to (an unfinished
    /// deploy at start-up); `Err` says why a batch failed.
    pub(super) async fn finish_on(&mut self, release: &str) -> anyhow::Result<()> {
        match rollout::finish_on(&mut Servers(self), release, &default_settings()).await? {
            Ok(()) => Ok(()),
            Err(why) => Err(anyhow::anyhow!(why)),
        }
    }

    /// Launches one server of `role` on `release` per server in `replacing` (registered with
    /// the load balancer first, so its checks start at once); a new worker takes over Celery
    /// beat from the one it replaces.
    async fn launch(
        &mut self,
        role: Role,
        release: &str,
        replacing: &[String],
    ) -> anyhow::Result<Launched> {
        let mut new = Vec::new();
        for old in replacing {
            let mut server =
                self.registry
                    .new_group_server(role, self.env.local().addresses, release);
            server.beat = self.registry.get(old).is_some_and(|s| s.beat);
            self.registry.servers.push(server.clone());
            new.push(server);
        }
        let ids: Vec<String> = new.iter().map(|s| s.id.clone()).collect();
        self.save_registry()?;
        self.update_load_balancer().await?;
        let launched = self.launcher().start_all(new).await;
        if let Err(error) = self.absorb(launched) {
            return Ok(Launched::Failed {
                servers: ids,
                why: format!("{error:#}"),
            });
        }
        self.update_load_balancer().await?;
        Ok(Launched::Servers(ids))
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

    /// Stops sending requests to a web server and waits (bounded) for those in progress.
    async fn drain(&mut self, id: &str, timeout: Duration) {
        let socket = self.env.paths.server("lb").join("run/haproxy/haproxy.sock");
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

    fn say(&mut self, message: String) {
        tracing::info!("{message}");
        self.publish(Phase::Deploying, message);
    }
}

/// The supervisor's group servers as the engine's rollout drives them.
struct Servers<'a>(&'a mut Supervisor);

impl RolloutTarget for Servers<'_> {
    type Error = anyhow::Error;

    fn has_group(&self, role: Role) -> bool {
        matches!(role, Role::Web | Role::Worker)
    }

    async fn outdated(&mut self, role: Role, release: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .0
            .registry
            .group_members(role)
            .filter(|s| s.release != release)
            .map(|s| s.id.clone())
            .collect())
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
        self.0.launch(role, release, replacing).await
    }

    async fn observe(&mut self, role: Role, servers: &[String]) -> anyhow::Result<Observation> {
        Ok(self.0.observe(role, servers).await)
    }

    async fn explain(&mut self, role: Role, servers: &[String]) -> String {
        self.0.explain(role, servers).await
    }

    async fn discard(&mut self, _role: Role, servers: &[String]) -> anyhow::Result<()> {
        for id in servers {
            if let Err(error) = self.0.terminate_server(id).await {
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
            match role {
                Role::Web => self.0.drain(id, settings.drain_timeout).await,
                _ => {
                    self.0.say(format!(
                        "{id}: warm shutdown of Celery (up to {} s for running tasks)",
                        settings.worker_stop_timeout.as_secs()
                    ));
                    // Celery's warm shutdown (SIGTERM) gets the deploy's time for running
                    // tasks.
                    if let Some(worker) = self.0.services.get_mut(&format!("{id}/celery-worker")) {
                        worker.spec.stop_timeout = settings.worker_stop_timeout;
                    }
                }
            }
            if let Err(error) = self.0.terminate_server(id).await {
                tracing::error!("{error:#}");
            }
        }
        Ok(())
    }

    async fn end(&mut self, _role: Role) -> anyhow::Result<()> {
        Ok(())
    }

    fn report(&mut self, message: &str) {
        self.0.say(message.to_owned());
    }
}
