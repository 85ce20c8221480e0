//! Database operations the supervisor performs (it owns the processes): a planned or forced
//! failover to a replica, and rebuilding a replica from the primary.
//!
//! The failover is the engine's ([`rigger_engine::failover`]: pause, catch up, promote,
//! switch, repoint, resume, and when each may give up); here is how each step is done on this
//! machine. Each pool is paused with a deadline that resumes it by itself if this supervisor
//! dies before it does ([`crate::pgbouncer`]). The switch fences the old primary (stopped, its
//! directory moved to `terminated/`: it never accepts a write again), renders the new
//! primary's configuration and rebuilds the other replicas from it; repointing re-renders
//! every web and worker server's stunnel and PgBouncer with a reload (no app restart).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use rigger_engine::failover::{self, Failover, FailoverTarget};
use rigger_recipes::operations::PAUSE_DEADLINE;
use rigger_recipes::{Phase as StepPhase, Role};
use serde::{Deserialize, Serialize};

use super::rolling::LoopHandle;
use super::{Supervisor, run_steps};
use crate::apply;
use crate::environment::LocalEnvironment;
use crate::paths::EnvPaths;
use crate::pgbouncer::{AdminConsole, HelperFiles, ResumeDeadline, Resumed};
use crate::prepare::Prepared;
use crate::process;
use crate::registry::{ServerRecord, ServerState, write_atomically};
use crate::status::Phase;
use rigger_plan::deploys::OperationRecord;

/// How long pausing the pools and catching up may take before a planned failover gives up
/// (and resumes, changing nothing).
pub(super) const PAUSE_TIMEOUT: Duration = Duration::from_secs(15);

/// A database operation running beside the supervisor's loop: a summary, and for a failover
/// how long writes were held.
pub(super) type DbFlow = Pin<Box<dyn Future<Output = anyhow::Result<(String, Option<f64>)>>>>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbRequest {
    pub id: String,
    /// `promote` or `reseed`.
    pub operation: String,
    pub server: Option<String>,
    #[serde(default)]
    pub force: bool,
    /// Who asked (`user@host`), for the history.
    #[serde(default)]
    pub requested_by: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DbOutcome {
    pub request: String,
    pub succeeded: bool,
    pub message: String,
    /// Seconds during which writes were refused or waited (failover only).
    pub writes_paused_secs: Option<f64>,
}

pub fn request_path(paths: &EnvPaths) -> std::path::PathBuf {
    paths.root().join("db/request.json")
}

pub fn outcome_path(paths: &EnvPaths) -> std::path::PathBuf {
    paths.root().join("db/outcome.json")
}

/// Where the supervisor records that it began a database operation.
pub fn begun_path(paths: &EnvPaths) -> std::path::PathBuf {
    paths.root().join("db/begun.json")
}

fn read_begun(paths: &EnvPaths) -> std::io::Result<Option<crate::deploy::Begun>> {
    crate::registry::read_state(
        &begun_path(paths),
        "the supervisor's record that a database operation began: `rigger db history` says \
         how it ended; remove the file",
    )
}

/// The history of database operations, one JSON record per line (`rigger db history`).
fn history_path(paths: &EnvPaths) -> std::path::PathBuf {
    paths.root().join("db/history.jsonl")
}

/// The database operations the supervisor performed, oldest first.
pub fn history(paths: &EnvPaths) -> anyhow::Result<Vec<OperationRecord>> {
    crate::files::read_records(
        &history_path(paths),
        "a database operation's record",
        "the history of database operations is damaged: fix or remove that line",
    )
}

pub fn write_request(paths: &EnvPaths, request: &DbRequest) -> anyhow::Result<()> {
    crate::files::create_private_dir(&paths.root().join("db"))?;
    Ok(write_atomically(
        &request_path(paths),
        &serde_json::to_vec_pretty(request)?,
    )?)
}

/// How the supervisor says the last database operation ended; `None` before the first. A
/// damaged one is an error naming it.
pub fn read_outcome(paths: &EnvPaths) -> std::io::Result<Option<DbOutcome>> {
    crate::registry::read_state(
        &outcome_path(paths),
        "the supervisor's answer to the last `rigger db` operation: `rigger db status` says \
         where the databases are; remove the file",
    )
}

/// The database request the CLI wrote; `None` when there is none. A damaged one is an error
/// naming it.
pub fn read_request(paths: &EnvPaths) -> std::io::Result<Option<DbRequest>> {
    crate::registry::read_state(
        &request_path(paths),
        "the request `rigger db` hands the supervisor: run the command again (it writes a new \
         one)",
    )
}

impl Supervisor {
    /// The request in `db/request.json` (SIGUSR2), once: `None` when there is none or it was
    /// handled already.
    pub(super) fn take_db_request(&mut self) -> Option<DbRequest> {
        let request = self.readable_request(
            read_request(&self.env.paths),
            &request_path(&self.env.paths),
        )?;
        if self.last_db_request.as_deref() == Some(request.id.as_str()) {
            return None;
        }
        self.last_db_request = Some(request.id.clone());
        Some(request)
    }

    /// Starts a database operation beside the loop (as a deploy runs): what it needs is
    /// found and checked here; the flow waits (catching up, promoting, a base backup) beside
    /// the loop, asking it for the steps that change its servers. The loop calls
    /// [`Supervisor::finish_db_request`] when it ends.
    pub(super) fn start_db_operation(&mut self, request: &DbRequest) -> DbFlow {
        let started = match request.operation.as_str() {
            "promote" => self.start_promote(request.server.as_deref(), request.force),
            "reseed" => Ok(self.start_reseed(request.server.clone())),
            other => Err(anyhow::anyhow!("unknown database operation `{other}`")),
        };
        match started {
            Ok(flow) => {
                self.begin_operation(self.health_timeout);
                flow
            }
            Err(error) => Box::pin(std::future::ready(Err(error))),
        }
    }

    /// Records how a database operation ended: the outcome the CLI waits for, the history
    /// (`result` is `failed` or `interrupted` on `Err`), the status.
    pub(super) fn finish_db_request(
        &mut self,
        request: &DbRequest,
        ended: Result<(String, Option<f64>), (&'static str, anyhow::Error)>,
    ) {
        let (result, outcome) = match ended {
            Ok((message, paused)) => (
                "succeeded",
                DbOutcome {
                    request: request.id.clone(),
                    succeeded: true,
                    message,
                    writes_paused_secs: paused,
                },
            ),
            Err((result, error)) => (
                result,
                DbOutcome {
                    request: request.id.clone(),
                    succeeded: false,
                    message: format!("{error:#}"),
                    writes_paused_secs: None,
                },
            ),
        };
        tracing::info!(succeeded = outcome.succeeded, "{}", outcome.message);
        self.record_db_operation(request, result, &outcome.message);
        let message = outcome
            .message
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        self.publish(
            if outcome.succeeded {
                Phase::Ready
            } else {
                Phase::Healing
            },
            message,
        );
        if let Ok(bytes) = serde_json::to_vec_pretty(&outcome) {
            let _ = crate::files::create_private_dir(&self.env.paths.root().join("db"));
            let _ = write_atomically(&outcome_path(&self.env.paths), &bytes);
        }
    }

    /// Appends the operation to `db/history.jsonl`, started when its `db/begun.json` says.
    fn record_db_operation(&self, request: &DbRequest, result: &str, reason: &str) {
        let now = rigger_engine::clock::unix_now();
        let started = read_begun(&self.env.paths)
            .ok()
            .flatten()
            .filter(|begun| begun.request == request.id)
            .map_or(now, |begun| begun.started);
        let record = OperationRecord {
            operation: format!("db {}", request.operation),
            server: request.server.clone().unwrap_or_default(),
            by: request.requested_by.clone(),
            started,
            finished: now,
            result: result.to_owned(),
            reason: if result == "succeeded" {
                String::new()
            } else {
                reason.to_owned()
            },
        };
        if let Err(error) = crate::files::append_record(&history_path(&self.env.paths), &record) {
            tracing::error!("recording the database operation in its history: {error:#}");
        }
    }

    /// A database operation the previous supervisor began and never ended (it was killed: a
    /// SIGTERM records its outcome): recorded `interrupted` now, in the history and as the
    /// outcome, saying what start-up finished (`switch_finished`: the replica whose promotion
    /// it completed) and what is left to do.
    pub(super) fn record_db_operation_left_by_a_dead_supervisor(
        &mut self,
        switch_finished: Option<&str>,
    ) {
        let Some(request) = self.readable_request(
            read_request(&self.env.paths),
            &request_path(&self.env.paths),
        ) else {
            return;
        };
        if crate::deploy::Begun::unanswered(
            read_begun(&self.env.paths),
            &request.id,
            self.last_db_request.as_deref(),
        )
        .is_none()
        {
            return;
        }
        self.last_db_request = Some(request.id.clone());
        let why = match (request.operation.as_str(), switch_finished) {
            ("promote", Some(promoted)) => format!(
                "the supervisor died during `db promote`; its successor finished the switch: \
                 {promoted} is the primary"
            ),
            ("promote", None) => {
                let primary = self
                    .registry
                    .servers
                    .iter()
                    .find(|s| s.has_role(Role::DbPrimary))
                    .map_or("no server", |s| s.id.as_str());
                format!(
                    "the supervisor died during `db promote`; {primary} is the primary (paused \
                     pools resumed at their deadline): if that is the server to replace, run \
                     `rigger db promote` again"
                )
            }
            (operation, _) => format!(
                "the supervisor died during `db {operation}`; run `rigger db {operation}` again"
            ),
        };
        self.finish_db_request(&request, Err(("interrupted", anyhow::anyhow!(why))));
    }

    /// Fails over to `replica` (default: the first) with the engine's failover
    /// ([`rigger_engine::failover`]), beside the loop. The flow ends with a summary and how
    /// long writes were held. With no primary left (a failover cut off after fencing it), it
    /// finishes that failover.
    fn start_promote(&mut self, replica: Option<&str>, force: bool) -> anyhow::Result<DbFlow> {
        let primary = self
            .registry
            .servers
            .iter()
            .find(|s| s.has_role(Role::DbPrimary))
            .cloned();
        let replica = match replica {
            Some(id) => self
                .registry
                .get(id)
                .cloned()
                .with_context(|| format!("no server `{id}`"))?,
            None => self
                .registry
                .servers
                .iter()
                .find(|s| s.has_role(Role::DbReplica))
                .cloned()
                .context(
                    "there is no replica to promote; `rigger db reseed` builds one from the primary",
                )?,
        };
        if !replica.has_role(Role::DbReplica) {
            bail!(
                "{} is not a replica (roles: {})",
                replica.id,
                replica.roles.join(", ")
            );
        }
        let from = primary
            .as_ref()
            .map_or("a fenced primary", |p| p.id.as_str());
        self.publish(
            Phase::Healing,
            format!("failing over from {from} to {}", replica.id),
        );
        let app_servers: Vec<ServerRecord> = self
            .registry
            .servers
            .iter()
            .filter(|s| s.group().is_some() && s.state == ServerState::InService)
            .cloned()
            .collect();
        let failover = Failover {
            primary: primary.as_ref().map(|p| p.id.clone()),
            replica: replica.id.clone(),
            replica_application_name: replica.id.clone(),
            force,
        };
        let mut target = LoopDatabases {
            link: self.loop_handle(),
            env: Arc::clone(&self.env),
            prepared: self.prepared(),
            primary,
            replica: replica.clone(),
            app_servers,
            deadlines: BTreeMap::new(),
        };
        Ok(Box::pin(async move {
            let promoted = failover::promote(&mut target, &failover).await?;
            let fenced = promoted
                .switched
                .map_or_else(String::new, |id| format!("; {id} is fenced (stopped)"));
            let lost = if promoted.lost.is_empty() {
                String::new()
            } else {
                format!(" ({})", promoted.lost)
            };
            Ok((
                format!("{} is the primary{fenced}{lost}", replica.id),
                Some(promoted.writes_held.as_secs_f64()),
            ))
        }))
    }

    /// The switch of a failover, once `replica` is promoted: fences `primary` (if it is still
    /// there), makes the replica the primary in the registry and in its configuration, and
    /// rebuilds the other replicas from it. The fenced server, if one was.
    async fn switch_to(
        &mut self,
        primary: Option<&ServerRecord>,
        replica: &ServerRecord,
    ) -> anyhow::Result<Option<String>> {
        // Fence the old primary before anyone can write to it again.
        if let Some(primary) = primary {
            self.terminate_server(&primary.id)
                .await
                .context("fencing the old primary")?;
        }
        if let Some(record) = self.registry.get_mut(&replica.id) {
            record.roles = vec![Role::DbPrimary.as_str().to_owned()];
        }
        self.save_registry()?;
        // The registry says it now: a successor starts the new primary as such.
        Promotion::remove(&self.env.paths)?;
        // Its configuration must say primary from now on (a restart must not make it a standby).
        self.reapply(&replica.id)
            .await
            .context("rendering the new primary's configuration")?;
        for other in self
            .registry
            .servers
            .iter()
            .filter(|s| s.has_role(Role::DbReplica))
            .cloned()
            .collect::<Vec<_>>()
        {
            // Other replicas would follow the old primary: rebuild them from the new one.
            self.reseed(Some(&other.id)).await?;
        }
        Ok(primary.map(|p| p.id.clone()))
    }

    /// Rebuilds a replica (default: the first) from the primary, beside the loop: the old one
    /// goes and a new one (next number) is cloned with a fresh base backup, which the flow
    /// waits for beside the loop.
    fn start_reseed(&mut self, replica: Option<String>) -> DbFlow {
        let link = self.loop_handle();
        Box::pin(async move {
            let (old, added, launcher) = link
                .call(async move |supervisor: &mut Supervisor| {
                    supervisor.begin_reseed(replica.as_deref()).await
                })
                .await??;
            let started = launcher.start_all(added.clone()).await;
            link.call(async move |supervisor: &mut Supervisor| {
                supervisor.end_reseed(old, &added, started).await
            })
            .await?
            .map(|message| (message, None))
        })
    }

    /// [`Supervisor::start_reseed`] within a step of the loop (a failover's switch rebuilds
    /// the other replicas from the new primary before it repoints anyone).
    async fn reseed(&mut self, replica: Option<&str>) -> anyhow::Result<String> {
        let (old, added, launcher) = self.begin_reseed(replica).await?;
        let started = launcher.start_all(added.clone()).await;
        self.end_reseed(old, &added, started).await
    }

    /// A reseed's first step: the old replica goes, the new one is recorded and given its
    /// slot and pg_hba line on the primary; returns the old one's id, the new servers and the
    /// launcher that starts them (with their base backup).
    async fn begin_reseed(
        &mut self,
        replica: Option<&str>,
    ) -> anyhow::Result<(Option<String>, Vec<ServerRecord>, super::Launcher)> {
        let old = match replica {
            Some(id) => Some(
                self.registry
                    .get(id)
                    .cloned()
                    .with_context(|| format!("no server `{id}`"))?,
            ),
            None => self
                .registry
                .servers
                .iter()
                .find(|s| s.has_role(Role::DbReplica))
                .cloned(),
        };
        if let Some(old) = &old {
            if !old.has_role(Role::DbReplica) {
                bail!(
                    "{} is not a replica (roles: {})",
                    old.id,
                    old.roles.join(", ")
                );
            }
            self.publish(Phase::Healing, format!("rebuilding replica {}", old.id));
            self.terminate_server(&old.id).await?;
        }
        let release = self.current_release();
        let added = self
            .env
            .add_missing_stand_alone_servers(&mut self.registry, &release);
        self.save_registry()?;
        // The primary needs the new replica's slot (and pg_hba line) before the base backup.
        if let Some(primary) = self
            .registry
            .servers
            .iter()
            .find(|s| s.has_role(Role::DbPrimary))
            .cloned()
        {
            self.reapply(&primary.id)
                .await
                .context("adding the replica to the primary")?;
        }
        Ok((old.map(|o| o.id), added, self.launcher()))
    }

    /// A reseed's last step, once the new replica started (or did not): its services taken
    /// over, and every app server's PgBouncer serving the replica's name from it again.
    async fn end_reseed(
        &mut self,
        old: Option<String>,
        added: &[ServerRecord],
        started: super::Launched,
    ) -> anyhow::Result<String> {
        self.absorb(started)?;
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
        let names: Vec<&str> = added.iter().map(|s| s.id.as_str()).collect();
        Ok(match old {
            Some(old) => format!(
                "replica {old} rebuilt from the primary as {}",
                names.join(", ")
            ),
            None => format!("replica {} built from the primary", names.join(", ")),
        })
    }

    /// Renders a running server's recipe again, writes what changed, runs its after-start
    /// steps, and reloads the services that have a reload signal.
    pub(super) async fn reapply(&mut self, id: &str) -> anyhow::Result<()> {
        let server = self
            .registry
            .get(id)
            .cloned()
            .with_context(|| format!("no server `{id}`"))?;
        let manifest = crate::release::ReleaseManifest::load(&self.env.paths, &server.release)?;
        let ctx = self.env.context(
            &server,
            &self.registry,
            &self.prepared().secrets,
            &manifest.venv,
            &manifest.dir(&self.env.paths),
        );
        let recipe = rigger_recipes::render_server(&ctx)?;
        let mut changed = false;
        for dir in &recipe.dirs {
            apply::ensure_dir(dir)?;
        }
        for file in &recipe.files {
            changed |= apply::ensure_file(file)?;
        }
        // A promoted replica's standby.signal must go, or a restart would make it a standby.
        if server.has_role(Role::DbPrimary) {
            let _ = std::fs::remove_file(ctx.layout.data("postgresql").join("standby.signal"));
        }
        run_steps(
            &recipe,
            StepPhase::AfterStart,
            &ctx.layout.log_dir.join("steps.log"),
        )
        .await?;
        if changed {
            for service in self.services.values().filter(|s| s.server == id) {
                if let Some(signal) = service.spec.reload_signal {
                    process::signal(&service.record, super::to_nix(signal))
                        .with_context(|| format!("reloading {}/{}", id, service.spec.name))?;
                }
            }
        }
        // The server now runs this configuration (applied in place, as a failover applies
        // it): a successor supervisor adopts its services rather than restarting them all
        // (the new primary's PostgreSQL, every web server at once).
        super::record_applied(
            &self.env,
            id,
            (&recipe, &super::takeover::comparable(&recipe)),
            &ctx.layout.tls_dir,
            self.services.values_mut().filter(|s| s.server == id),
        );
        Ok(())
    }
}

/// A failover past its point of no return: `promoted` may run as a primary already, and
/// `fenced` (the old primary) must never run again. Written just before the promotion and
/// removed once the registry says so; a supervisor that finds it at start finishes the
/// switch before it starts any database server ([`Supervisor::finish_an_interrupted_switch`]).
/// Without it, a supervisor killed between promoting the replica and recording the switch
/// left a successor that started the old primary again beside the promoted replica (or, its
/// files already buried, an empty new primary): found by bench/chaos.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Promotion {
    pub fenced: Option<String>,
    pub promoted: String,
}

impl Promotion {
    fn save(&self, paths: &EnvPaths) -> anyhow::Result<()> {
        write_atomically(&paths.promotion(), &serde_json::to_vec(self)?)
            .context("recording the promotion")
    }

    pub(super) fn load(paths: &EnvPaths) -> anyhow::Result<Option<Promotion>> {
        let path = paths.promotion();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).with_context(|| {
                format!(
                    "{} is damaged: it names the failover a dead supervisor was promoting; \
                     check `rigger db status`, then remove it",
                    path.display()
                )
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub(super) fn remove(paths: &EnvPaths) -> anyhow::Result<()> {
        match std::fs::remove_file(paths.promotion()) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(error).context("removing the promotion record")
            }
            _ => Ok(()),
        }
    }
}

impl Supervisor {
    /// Finishes the switch of a failover whose supervisor died past its point of no return
    /// ([`Promotion`]), before any server starts: the old primary's processes stopped and its
    /// server forgotten (its files kept under `terminated/`), the promoted replica given the
    /// primary's role, its standby signal removed, and promoted if it runs still in recovery
    /// (a no-op when it was). The bring-up then starts it as the primary and rebuilds a
    /// replica from it. The promoted server's id when there was a switch to finish.
    pub(super) async fn finish_an_interrupted_switch(&mut self) -> anyhow::Result<Option<String>> {
        let Some(promotion) = Promotion::load(&self.env.paths)? else {
            return Ok(None);
        };
        tracing::warn!(promoted = %promotion.promoted, fenced = ?promotion.fenced,
            "finishing the switch of a failover a dead supervisor had begun");
        if let Some(old) = &promotion.fenced {
            for (name, outcome) in
                process::stop_leftovers(&self.env.paths.server(old), Duration::from_secs(30)).await
            {
                tracing::warn!(process = %name, ?outcome, "fenced the old primary");
            }
            self.registry.remove(old);
            self.save_registry()?;
            super::bury(&self.env, old)?;
        }
        if let Some(record) = self.registry.get_mut(&promotion.promoted) {
            record.roles = vec![Role::DbPrimary.as_str().to_owned()];
        }
        self.save_registry()?;
        let layout = self.env.server_layout(&promotion.promoted);
        let _ = std::fs::remove_file(layout.data("postgresql").join("standby.signal"));
        if let Err(error) = crate::on_server::psql(
            &self.env,
            &promotion.promoted,
            rigger_recipes::sql::PROMOTE_IF_IN_RECOVERY,
        )
        .await
        {
            // Not running: it starts as a primary (no standby signal).
            tracing::info!(server = %promotion.promoted, "promoting at take-over: {error:#}");
        }
        Promotion::remove(&self.env.paths)?;
        Ok(Some(promotion.promoted))
    }
}

/// Arms `server`'s pause deadline (recorded in `deadlines`, so it is disarmed or left to
/// fire with the others), then pauses its PgBouncer.
async fn pause(
    env: &LocalEnvironment,
    prepared: &Prepared,
    server: &ServerRecord,
    deadlines: &mut BTreeMap<String, ResumeDeadline>,
) -> anyhow::Result<()> {
    let console = pgbouncer_console(prepared, server);
    let dir = env.paths.server(&server.id);
    let files = HelperFiles {
        pid: dir
            .join("pids")
            .join(format!("{}.pid", super::PGBOUNCER_RESUME_HELPER)),
        log: dir
            .join("log")
            .join(format!("{}.log", super::PGBOUNCER_RESUME_HELPER)),
    };
    let name = format!("{}/{}", server.id, super::PGBOUNCER_RESUME_HELPER);
    let deadline = ResumeDeadline::arm(&name, &console, PAUSE_DEADLINE, &files).await?;
    deadlines.insert(server.id.clone(), deadline);
    console.run("PAUSE", PAUSE_TIMEOUT).await.map(drop)
}

/// Resumes every pool, then disarms the deadline of each one resumed. A pool that cannot
/// be resumed keeps its deadline, which tries again when it fires.
async fn resume_all(
    prepared: &Prepared,
    servers: &[ServerRecord],
    mut deadlines: BTreeMap<String, ResumeDeadline>,
) -> Vec<String> {
    let mut failed = Vec::new();
    for server in servers {
        let disarm = deadlines.remove(&server.id).map(ResumeDeadline::disarm);
        if let Err(why) = resume_pool(prepared, server, disarm).await {
            failed.push(why);
        }
    }
    failed
}

/// Resumes `server`'s PgBouncer, then disarms its pause deadline (`disarm`); one that could
/// not be resumed keeps its deadline, which will resume it. `Err` names the server and why.
pub(super) async fn resume_pool(
    prepared: &Prepared,
    server: &ServerRecord,
    disarm: Option<impl std::future::Future<Output = ()>>,
) -> Result<(), String> {
    match pgbouncer_console(prepared, server)
        .resume(PAUSE_TIMEOUT)
        .await
    {
        Ok(resumed) => {
            if resumed == Resumed::Already {
                tracing::warn!(server = %server.id, "PgBouncer was no longer paused: its pause deadline had resumed it");
            }
            if let Some(disarm) = disarm {
                disarm.await;
            }
            Ok(())
        }
        Err(error) => {
            tracing::error!(server = %server.id, "resuming PgBouncer (its pause deadline will): {error:#}");
            Err(format!("{}: {error:#}", server.id))
        }
    }
}

/// The admin console of an app server's PgBouncer, as rigger's admin user.
pub(super) fn pgbouncer_console(prepared: &Prepared, server: &ServerRecord) -> AdminConsole {
    AdminConsole::of_server(
        server.address.to_string(),
        prepared
            .secrets
            .pgbouncer_admin_password
            .expose()
            .to_owned(),
    )
}

/// The supervisor's databases and app servers as the engine's failover drives them, from
/// beside the loop: pools are paused and resumed and databases queried from here; switching
/// roles and repointing app servers are steps of the loop's.
struct LoopDatabases {
    link: LoopHandle,
    env: Arc<LocalEnvironment>,
    prepared: Arc<Prepared>,
    primary: Option<ServerRecord>,
    replica: ServerRecord,
    app_servers: Vec<ServerRecord>,
    /// Each paused pool's deadline, disarmed once it is resumed.
    deadlines: BTreeMap<String, ResumeDeadline>,
}

impl FailoverTarget for LoopDatabases {
    type Error = anyhow::Error;
    type Switched = Option<String>;

    async fn pause_pools(&mut self) -> Vec<String> {
        let mut failed = Vec::new();
        for server in &self.app_servers {
            if let Err(error) = pause(&self.env, &self.prepared, server, &mut self.deadlines).await
            {
                failed.push(format!("{}: {error:#}", server.id));
            }
        }
        failed
    }

    /// PgBouncer's pools are repointed by a reload of the new configuration, which drops
    /// server connections to the old primary by itself: `reconnect` has nothing to add.
    async fn resume_pools(&mut self, _reconnect: bool) -> Vec<String> {
        let deadlines = std::mem::take(&mut self.deadlines);
        resume_all(&self.prepared, &self.app_servers, deadlines).await
    }

    async fn query(&mut self, server: &str, sql: &str) -> anyhow::Result<String> {
        let record = [self.primary.as_ref(), Some(&self.replica)]
            .into_iter()
            .flatten()
            .find(|s| s.id == server)
            .with_context(|| format!("`{server}` is not a database server of this failover"))?;
        crate::on_server::psql(&self.env, &record.id, sql).await
    }

    async fn promoting(&mut self) -> anyhow::Result<()> {
        Promotion {
            fenced: self.primary.as_ref().map(|p| p.id.clone()),
            promoted: self.replica.id.clone(),
        }
        .save(&self.env.paths)
    }

    async fn switch(&mut self) -> anyhow::Result<Option<String>> {
        let (primary, replica) = (self.primary.clone(), self.replica.clone());
        self.link
            .call(async move |supervisor: &mut Supervisor| {
                supervisor.switch_to(primary.as_ref(), &replica).await
            })
            .await?
    }

    async fn repoint(&mut self) -> anyhow::Result<()> {
        let app_servers: Vec<String> = self.app_servers.iter().map(|s| s.id.clone()).collect();
        self.link
            .call(async move |supervisor: &mut Supervisor| {
                for id in &app_servers {
                    supervisor
                        .reapply(id)
                        .await
                        .with_context(|| format!("repointing {id}"))?;
                }
                Ok(())
            })
            .await?
    }

    fn report(&mut self, message: &str) {
        tracing::info!("failover: {message}");
    }
}
