//! Database operations the supervisor performs (it owns the processes): a planned or forced
//! failover to a replica, and rebuilding a replica from the primary.
//!
//! A planned failover pauses every PgBouncer (transactions in flight finish; new ones wait),
//! waits until the replica has replayed everything the primary wrote, promotes it, fences the
//! old primary (stopped, its directory moved to `terminated/`: it never accepts a write
//! again), points every web and worker server's stunnel and PgBouncer at the new primary with
//! a reload (no app restart), and resumes. Writes wait for a few seconds; none is lost. Each
//! pool is paused with a deadline that resumes it by itself if this supervisor dies before it
//! does ([`crate::pgbouncer`]); the failover promotes only with time left on every deadline to
//! fence the old primary first, so a deadline never resumes writes onto it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rigger_recipes::operations::{PAUSE_DEADLINE, PROMOTE_BUDGET};
use rigger_recipes::{Phase as StepPhase, Role};
use serde::{Deserialize, Serialize};

use super::{Supervisor, run_steps};
use crate::apply;
use crate::paths::EnvPaths;
use crate::pgbouncer::{AdminConsole, HelperFiles, ResumeDeadline, Resumed};
use crate::process;
use crate::registry::{ServerRecord, ServerState, write_atomically};
use crate::status::Phase;

/// How long pausing the pools and catching up may take before a planned failover gives up
/// (and resumes, changing nothing).
const PAUSE_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbRequest {
    pub id: String,
    /// `promote` or `reseed`.
    pub operation: String,
    pub server: Option<String>,
    #[serde(default)]
    pub force: bool,
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

pub fn write_request(paths: &EnvPaths, request: &DbRequest) -> anyhow::Result<()> {
    crate::files::create_private_dir(&paths.root().join("db"))?;
    Ok(write_atomically(
        &request_path(paths),
        &serde_json::to_vec_pretty(request)?,
    )?)
}

pub fn read_outcome(paths: &EnvPaths) -> Option<DbOutcome> {
    serde_json::from_slice(&std::fs::read(outcome_path(paths)).ok()?).ok()
}

impl Supervisor {
    /// Handles `db/request.json` (SIGUSR2): each request once.
    pub(super) async fn handle_db_request(&mut self) {
        let Some(request) = std::fs::read(request_path(&self.env.paths))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<DbRequest>(&bytes).ok())
        else {
            return;
        };
        if self.last_db_request.as_deref() == Some(request.id.as_str()) {
            return;
        }
        self.last_db_request = Some(request.id.clone());
        let result = match request.operation.as_str() {
            "promote" => self.promote(request.server.as_deref(), request.force).await,
            "reseed" => self
                .reseed(request.server.as_deref())
                .await
                .map(|message| (message, None)),
            other => Err(anyhow::anyhow!("unknown database operation `{other}`")),
        };
        let outcome = match result {
            Ok((message, paused)) => DbOutcome {
                request: request.id,
                succeeded: true,
                message,
                writes_paused_secs: paused,
            },
            Err(error) => DbOutcome {
                request: request.id,
                succeeded: false,
                message: format!("{error:#}"),
                writes_paused_secs: None,
            },
        };
        tracing::info!(succeeded = outcome.succeeded, "{}", outcome.message);
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

    /// Fails over to `replica` (default: the first). Returns a summary and how long writes
    /// were held.
    async fn promote(
        &mut self,
        replica: Option<&str>,
        force: bool,
    ) -> anyhow::Result<(String, Option<f64>)> {
        let primary = self
            .registry
            .servers
            .iter()
            .find(|s| s.has_role(Role::DbPrimary))
            .cloned()
            .context("there is no primary")?;
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
        self.publish(
            Phase::Healing,
            format!("failing over from {} to {}", primary.id, replica.id),
        );
        let app_servers: Vec<ServerRecord> = self
            .registry
            .servers
            .iter()
            .filter(|s| s.group().is_some() && s.state == ServerState::InService)
            .cloned()
            .collect();

        let paused_at = Instant::now();
        // Each pool is paused with a deadline that resumes it by itself should this supervisor
        // die before resuming it (crate::pgbouncer).
        let mut deadlines: BTreeMap<String, ResumeDeadline> = BTreeMap::new();
        let mut lost_warning = String::new();
        if force {
            // The primary may be gone: nothing to wait for. Pausing is still worth trying, so
            // that requests wait for the new primary instead of failing against the old one.
            for server in &app_servers {
                if let Err(error) = self.pause(server, &mut deadlines).await {
                    tracing::warn!(server = %server.id, "pausing PgBouncer (continuing, forced): {error:#}");
                }
            }
            let lag = self.replica_lag_bytes(&primary, &replica).await;
            lost_warning = match lag {
                Some(0) => String::new(),
                Some(bytes) => format!(" (the replica was {bytes} bytes of WAL behind: writes after that point are lost)"),
                None => " (the primary could not be asked how far behind the replica was: the last writes may be lost)".into(),
            };
        } else {
            for server in &app_servers {
                if let Err(error) = self.pause(server, &mut deadlines).await {
                    self.resume_all(&app_servers, deadlines).await;
                    bail!(
                        "pausing PgBouncer on {}: {error:#}; nothing was changed, writes resumed",
                        server.id
                    );
                }
            }
            if let Err(error) = self.wait_caught_up(&primary, &replica).await {
                self.resume_all(&app_servers, deadlines).await;
                bail!("{error:#}; nothing was changed, writes resumed");
            }
        }
        // Past this point the old primary must be fenced before any pool resumes: go on only
        // with time left on every deadline for promoting and fencing.
        if let Some(left) = deadlines.values().map(ResumeDeadline::remaining).min()
            && left < PROMOTE_BUDGET
        {
            self.resume_all(&app_servers, deadlines).await;
            bail!(
                "pausing and catching up took {:.0} s, leaving {:.0} s of the pools' {} s pause \
                 deadline, less than the {} s promoting and fencing may take; nothing was \
                 changed, writes resumed",
                paused_at.elapsed().as_secs_f64(),
                left.as_secs_f64(),
                PAUSE_DEADLINE.as_secs(),
                PROMOTE_BUDGET.as_secs()
            );
        }
        // Whatever happens from here, the pools resume at the end (their deadline would
        // otherwise do it, later).
        let failed_over = self
            .fail_over_paused(&primary, &replica, &app_servers)
            .await;
        self.resume_all(&app_servers, deadlines).await;
        failed_over?;
        let paused = paused_at.elapsed().as_secs_f64();
        Ok((
            format!(
                "{} is the primary; {} is fenced (stopped){lost_warning}",
                replica.id, primary.id
            ),
            Some(paused),
        ))
    }

    /// The part of a failover done while the pools are paused: promotes `replica`, fences
    /// `primary`, rebuilds the other replicas from the new primary and repoints every app
    /// server at it.
    async fn fail_over_paused(
        &mut self,
        primary: &ServerRecord,
        replica: &ServerRecord,
        app_servers: &[ServerRecord],
    ) -> anyhow::Result<()> {
        // Promote, then fence the old primary before anyone can write to it again.
        self.psql(
            replica,
            "SELECT pg_promote(wait => true, wait_seconds => 30)",
        )
        .await
        .context("promoting the replica")?;
        if let Err(error) = self.terminate_server(&primary.id).await {
            tracing::error!("fencing the old primary: {error:#}");
        }
        if let Some(record) = self.registry.get_mut(&replica.id) {
            record.roles = vec![Role::DbPrimary.as_str().to_owned()];
        }
        self.save_registry()?;
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
        // Every app server's stunnel and PgBouncer now point at the new primary.
        for server in app_servers {
            self.reapply(&server.id)
                .await
                .with_context(|| format!("repointing {}", server.id))?;
        }
        Ok(())
    }

    /// Rebuilds a replica (default: the first) from the primary: the old one goes and a new
    /// one (next number) is cloned with a fresh base backup.
    async fn reseed(&mut self, replica: Option<&str>) -> anyhow::Result<String> {
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
        self.start_servers(added.clone()).await?;
        // App servers' PgBouncers serve the replica's name from it again.
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
                "replica {} rebuilt from the primary as {}",
                old.id,
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
        Ok(())
    }

    /// Arms `server`'s pause deadline (recorded in `deadlines`, so it is disarmed or left to
    /// fire with the others), then pauses its PgBouncer.
    async fn pause(
        &self,
        server: &ServerRecord,
        deadlines: &mut BTreeMap<String, ResumeDeadline>,
    ) -> anyhow::Result<()> {
        let console = self.pgbouncer_console(server);
        let dir = self.env.paths.server(&server.id);
        let files = HelperFiles {
            pid: dir.join("pids").join("pgbouncer-resume.pid"),
            log: dir.join("log").join("pgbouncer-resume.log"),
        };
        let name = format!("{}/pgbouncer-resume", server.id);
        let deadline = ResumeDeadline::arm(&name, &console, PAUSE_DEADLINE, &files).await?;
        deadlines.insert(server.id.clone(), deadline);
        console.run("PAUSE", PAUSE_TIMEOUT).await.map(drop)
    }

    /// Resumes every pool, then disarms the deadline of each one resumed. A pool that cannot
    /// be resumed keeps its deadline, which tries again when it fires.
    async fn resume_all(
        &self,
        servers: &[ServerRecord],
        mut deadlines: BTreeMap<String, ResumeDeadline>,
    ) {
        for server in servers {
            match self.pgbouncer_console(server).resume(PAUSE_TIMEOUT).await {
                Ok(resumed) => {
                    if resumed == Resumed::Already {
                        tracing::warn!(server = %server.id, "PgBouncer was no longer paused: its pause deadline had resumed it");
                    }
                    if let Some(deadline) = deadlines.remove(&server.id) {
                        deadline.disarm().await;
                    }
                }
                Err(error) => {
                    tracing::error!(server = %server.id, "resuming PgBouncer (its pause deadline will): {error:#}");
                }
            }
        }
    }

    /// Waits until the replica has replayed everything the primary has written.
    async fn wait_caught_up(
        &self,
        primary: &ServerRecord,
        replica: &ServerRecord,
    ) -> anyhow::Result<()> {
        let target = self
            .psql(primary, "SELECT pg_current_wal_lsn()")
            .await
            .context("reading the primary's position")?;
        let Some(caught_up_sql) = rigger_recipes::sql::replayed_up_to(target.trim()) else {
            bail!(
                "the primary answered `{}` for its WAL position",
                target.trim()
            );
        };
        let started = Instant::now();
        loop {
            let caught_up = self
                .psql(replica, &caught_up_sql)
                .await
                .context("reading the replica's position")?;
            if caught_up.trim() == "t" {
                return Ok(());
            }
            if started.elapsed() > PAUSE_TIMEOUT {
                bail!(
                    "{} did not replay up to {} within {} s",
                    replica.id,
                    target.trim(),
                    PAUSE_TIMEOUT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn replica_lag_bytes(
        &self,
        primary: &ServerRecord,
        replica: &ServerRecord,
    ) -> Option<i64> {
        let sql = rigger_recipes::sql::replica_lag_bytes(&replica.id);
        self.psql(primary, &sql).await.ok()?.trim().parse().ok()
    }

    /// Runs one SQL statement as the postgres superuser over a database server's socket.
    pub(super) async fn psql(&self, server: &ServerRecord, sql: &str) -> anyhow::Result<String> {
        let socket = self.env.paths.server(&server.id).join("run/postgresql");
        run_psql(&socket, sql).await
    }

    /// The admin console of an app server's PgBouncer, as rigger's admin user.
    fn pgbouncer_console(&self, server: &ServerRecord) -> AdminConsole {
        AdminConsole::of_server(
            server.address.to_string(),
            self.prepared()
                .secrets
                .pgbouncer_admin_password
                .expose()
                .to_owned(),
        )
    }
}

/// `psql` as postgres over a Unix socket directory.
pub async fn run_psql(socket: &std::path::Path, sql: &str) -> anyhow::Result<String> {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("setpriv")
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
                "psql",
                "-XAtq",
                "-h",
            ])
            .arg(socket)
            .args(["-p", "5432", "-U", "postgres", "-d", "postgres", "-c", sql])
            .env_clear()
            .env("PATH", process::DEFAULT_PATH)
            .env("HOME", "/tmp")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("psql did not answer within 30 s")??;
    if !output.status.success() {
        bail!("{}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
