//! The supervisor's side of a deploy: migrations once, then a health-gated rolling
//! replacement of the web servers (launch a batch, wait until the load balancer reports it
//! healthy, drain and terminate the old batch), then the workers (the new one starts before
//! the old one gets its warm shutdown). When a batch is not healthy in time, the new servers
//! go and the group rolls back to the previous release, and the outcome says why.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rigger_plan::rollout::{self, BatchSize, GateResult, HealthGate};
use rigger_recipes::Role;

use super::{Supervisor, migrate};
use crate::deploy::{self, DeployOutcome, DeployRequest};
use crate::haproxy;
use crate::process;
use crate::registry::ServerRecord;
use crate::release::{self, DeployRecord, ReleaseManifest};
use crate::status::Phase;

/// How a rollout goes: servers at a time, and how long each wait may take.
#[derive(Debug, Clone, Copy)]
pub(super) struct RollSettings {
    pub(super) batch: BatchSize,
    /// New servers healthy within this, or the rollout fails.
    pub(super) health_timeout: Duration,
    /// An old web server finishes its requests within this, or is stopped anyway.
    pub(super) drain_timeout: Duration,
    /// An old worker's running tasks finish within this (Celery's warm shutdown), or it is
    /// killed.
    pub(super) worker_stop_timeout: Duration,
}

impl RollSettings {
    /// For rolling back an unfinished deploy at start-up: the CLI's defaults.
    pub(super) fn defaults() -> RollSettings {
        RollSettings {
            batch: BatchSize::default(),
            health_timeout: rollout::DEFAULT_HEALTH_TIMEOUT,
            drain_timeout: rollout::DEFAULT_DRAIN_TIMEOUT,
            worker_stop_timeout: rollout::DEFAULT_WORKER_STOP_TIMEOUT,
        }
    }
}
/// Consecutive healthy observations a new server needs (the load balancer already requires
/// `rise 2` checks before it says UP).
const STABLE_OBSERVATIONS: u32 = 2;

/// Why a rollout stopped.
pub(super) struct RollFailure {
    pub(super) reason: String,
    /// The servers of the failed batch, still running.
    failed_batch: Vec<String>,
}

impl Supervisor {
    /// Handles `deploy/request.json` (SIGUSR1): each request once.
    pub(super) async fn handle_deploy_request(&mut self) {
        let Some(request) = deploy::read_request(&self.env.paths) else {
            return;
        };
        if self.last_deploy_request.as_deref() == Some(request.id.as_str()) {
            return;
        }
        self.last_deploy_request = Some(request.id.clone());
        let started = Instant::now();
        let started_unix = rigger_engine::clock::unix_now();
        let (result, reason) = match self.deploy(&request).await {
            Ok(()) => ("succeeded", String::new()),
            Err((result, reason)) => (result, reason),
        };
        let outcome = DeployOutcome {
            request: request.id.clone(),
            release: request.release.clone(),
            result: result.into(),
            reason: reason.clone(),
            duration_secs: started.elapsed().as_secs_f64(),
        };
        let revision = ReleaseManifest::load(&self.env.paths, &request.release)
            .map(|m| m.revision)
            .unwrap_or_default();
        let record = DeployRecord {
            release: request.release.clone(),
            revision,
            by: request.requested_by.clone(),
            started: started_unix,
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
    async fn deploy(&mut self, request: &DeployRequest) -> Result<(), (&'static str, String)> {
        let failed = |reason: String| ("failed", reason);
        let release = request.release.clone();
        ReleaseManifest::load(&self.env.paths, &release).map_err(|e| failed(format!("{e:#}")))?;
        let settings = RollSettings {
            batch: request.batch.parse().map_err(failed)?,
            health_timeout: Duration::from_secs(request.health_timeout_secs),
            drain_timeout: Duration::from_secs(request.drain_timeout_secs),
            worker_stop_timeout: Duration::from_secs(request.worker_stop_timeout_secs),
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
        settings: RollSettings,
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

        let Err(failure) = self.roll(&release, settings).await else {
            self.registry.current_release = Some(release.clone());
            self.save_registry().map_err(|e| failed(format!("{e:#}")))?;
            self.say(format!("deploy {release}: every server runs it"));
            return Ok(());
        };

        // Roll back: the failed batch goes at once (it never served well), then everything
        // that already switched is replaced by the previous release, health-gated as well.
        self.say(format!(
            "deploy {release}: rolling back to {previous}: {}",
            failure.reason
        ));
        for id in &failure.failed_batch {
            if let Err(error) = self.terminate_server(id).await {
                tracing::error!("{error:#}");
            }
        }
        match self.roll(&previous, settings).await {
            Ok(()) => Err(("rolled back", failure.reason)),
            Err(again) => Err(failed(format!(
                "{}; then rolling back to {previous} failed too: {}",
                failure.reason, again.reason
            ))),
        }
    }

    /// Replaces every group server not on `release` by one that is: web servers in
    /// health-gated batches, then workers one at a time.
    pub(super) async fn roll(
        &mut self,
        release: &str,
        settings: RollSettings,
    ) -> Result<(), RollFailure> {
        let old_web: Vec<String> = self.members_not_on(Role::Web, release);
        for old_batch in rollout::batches(&old_web, settings.batch) {
            self.say(format!(
                "deploy {release}: replacing {}",
                old_batch.join(", ")
            ));
            let new = self
                .launch(Role::Web, release, old_batch.len(), &[])
                .await?;
            self.wait_healthy(&new, settings.health_timeout).await?;
            for old in &old_batch {
                self.drain(old, settings.drain_timeout).await;
                if let Err(error) = self.terminate_server(old).await {
                    tracing::error!("{error:#}");
                }
            }
        }
        let old_workers: Vec<ServerRecord> = self
            .registry
            .group_members(Role::Worker)
            .filter(|s| s.release != release)
            .cloned()
            .collect();
        for old in old_workers {
            self.say(format!(
                "deploy {release}: replacing {} (warm shutdown: running tasks finish)",
                old.id
            ));
            // The new worker starts first, so tasks are consumed throughout; it takes over
            // beat from the old one.
            self.launch(Role::Worker, release, 1, &[old.beat]).await?;
            // Celery's warm shutdown (SIGTERM) gets the deploy's time for running tasks.
            if let Some(worker) = self.services.get_mut(&format!("{}/celery-worker", old.id)) {
                worker.spec.stop_timeout = settings.worker_stop_timeout;
            }
            if let Err(error) = self.terminate_server(&old.id).await {
                tracing::error!("{error:#}");
            }
        }
        Ok(())
    }

    fn members_not_on(&self, role: Role, release: &str) -> Vec<String> {
        self.registry
            .group_members(role)
            .filter(|s| s.release != release)
            .map(|s| s.id.clone())
            .collect()
    }

    /// Launches `count` servers of `role` on `release` (registered with the load balancer
    /// first, so its checks start at once).
    async fn launch(
        &mut self,
        role: Role,
        release: &str,
        count: usize,
        beat: &[bool],
    ) -> Result<Vec<String>, RollFailure> {
        let mut new = Vec::new();
        for n in 0..count {
            let mut server =
                self.registry
                    .new_group_server(role, self.env.local().addresses, release);
            server.beat = beat.get(n).copied().unwrap_or(false);
            self.registry.servers.push(server.clone());
            new.push(server);
        }
        let ids: Vec<String> = new.iter().map(|s| s.id.clone()).collect();
        let fail = |reason: String| RollFailure {
            reason,
            failed_batch: ids.clone(),
        };
        self.save_registry().map_err(|e| fail(format!("{e:#}")))?;
        self.update_load_balancer()
            .await
            .map_err(|e| fail(format!("{e:#}")))?;
        let launched = self.launcher().start_all(new).await;
        let failed_ids = launched.failed.clone();
        if let Err(error) = self.absorb(launched) {
            let mut reason = format!("{error:#}");
            for id in &failed_ids {
                reason.push_str(&self.app_log_tail(id));
            }
            return Err(fail(reason));
        }
        self.update_load_balancer()
            .await
            .map_err(|e| fail(format!("{e:#}")))?;
        Ok(ids)
    }

    /// Waits until the load balancer reports every new server healthy, or explains why not.
    async fn wait_healthy(&mut self, new: &[String], timeout: Duration) -> Result<(), RollFailure> {
        let mut gate = HealthGate::new(new.to_vec(), timeout, STABLE_OBSERVATIONS);
        let started = Instant::now();
        loop {
            self.refresh_lb_states().await;
            let dead: std::collections::BTreeMap<String, String> = new
                .iter()
                .filter(|id| {
                    self.services
                        .values()
                        .any(|s| &s.server == *id && !s.record.is_alive())
                })
                .map(|id| (id.clone(), "a process of the server exited".to_owned()))
                .collect();
            match gate.observe(started.elapsed(), &self.lb_states, &dead) {
                GateResult::Healthy => return Ok(()),
                GateResult::Waiting => tokio::time::sleep(Duration::from_millis(250)).await,
                GateResult::TimedOut { unhealthy } => {
                    let reason = self.explain_unhealthy(&unhealthy, timeout).await;
                    return Err(RollFailure {
                        reason,
                        failed_batch: new.to_vec(),
                    });
                }
                GateResult::Failed { server, why } => {
                    let mut reason = format!("{server}: {why}");
                    reason.push_str(&self.app_log_tail(&server));
                    return Err(RollFailure {
                        reason,
                        failed_batch: new.to_vec(),
                    });
                }
            }
        }
    }

    /// The evidence: the load balancer's reason, the health probe's answer, the app's log.
    async fn explain_unhealthy(
        &self,
        unhealthy: &BTreeMap<String, String>,
        timeout: Duration,
    ) -> String {
        let socket = self.env.paths.server("lb").join("run/haproxy/haproxy.sock");
        let stats = haproxy::stats(&socket).await.unwrap_or_default();
        let mut reason = format!("new servers not healthy after {} s:", timeout.as_secs());
        for (id, state) in unhealthy {
            let stat = stats.get(id).cloned().unwrap_or_default();
            reason.push_str(&format!(
                "\n  {id}: load balancer says {state} (last check {} {}: {})",
                stat.check_status, stat.check_code, stat.check_detail
            ));
            if let Some(server) = self.registry.get(id) {
                reason.push_str(&format!("\n  {id}: {}", self.probe_health(server).await));
            }
            reason.push_str(&self.app_log_tail(id));
        }
        reason
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
