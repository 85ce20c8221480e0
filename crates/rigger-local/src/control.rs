//! What the command line asks of a local environment: `up`, `down`, `status`, `scale`. These
//! talk to the environment's supervisor through its lock, its status file, its desired-counts
//! file and signals; they never touch a service process directly, except `down` cleaning up
//! after a supervisor that was killed.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rigger_engine::database::{
    self, DatabaseServer, DatabaseView, DbStatus, REPLICATION_STATUS_SQL, parse_replicas,
};
use rigger_engine::progress::Progress;
use rigger_recipes::operations;
use rigger_transport::Job;

use crate::desired::DesiredCounts;
use crate::environment::LocalEnvironment;
use crate::on_server;
use crate::process;
use crate::status::{Phase, ReplicaStatus, Status};
use crate::supervisor;

/// How long `up` waits for a first bring-up (the venv's first install dominates).
const UP_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Debug, Clone, PartialEq)]
pub enum UpOutcome {
    /// The supervisor was started and the environment is ready.
    Started(Status),
    /// It was already up and healthy: nothing changed.
    AlreadyUp(Status),
    /// It was up; the desired counts changed and it is ready again.
    Updated(Status),
}

/// Brings the environment up, or confirms it is. `progress` receives one line per phase.
pub async fn up(
    env: &LocalEnvironment,
    rigger: &Path,
    config_path: &Path,
    progress: &dyn Progress,
) -> anyhow::Result<UpOutcome> {
    wait_for_the_keepers_supervisor(env).await?;
    if let Some(holder) = supervisor::lock_holder(env) {
        // Running: the plan says whether anything differs from rigger.toml.
        let status = crate::status::load(&env.paths.status());
        if status.as_ref().is_some_and(|s| s.phase == Phase::Ready) && pending_changes(env)? == 0 {
            return Ok(UpOutcome::AlreadyUp(status.expect("checked")));
        }
        kill(Pid::from_raw(holder.pid), Signal::SIGHUP).context("signalling the supervisor")?;
        progress.report("asked the running supervisor to apply rigger.toml");
        let started = Instant::now();
        loop {
            let status = wait_ready(env, holder.pid, progress).await?;
            if pending_changes(env)? == 0 {
                return Ok(UpOutcome::Updated(status));
            }
            if started.elapsed() > UP_TIMEOUT {
                bail!(
                    "the environment did not converge within {} s",
                    UP_TIMEOUT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let _ = std::fs::remove_file(env.paths.status());
    env.paths
        .create_root()
        .with_context(|| format!("creating {}", env.paths.root().display()))?;
    let log = crate::files::open_private_log(&env.paths.supervisor_log())
        .with_context(|| format!("opening {}", env.paths.supervisor_log().display()))?;
    let config_path =
        std::fs::canonicalize(config_path).unwrap_or_else(|_| config_path.to_path_buf());
    // The keeper runs the supervisor, and runs it again should it die (keeper.rs).
    let child = rigger_command(rigger, &config_path, &env.name, "keep")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: the user's Ctrl-C on `up` must not reach the supervisor.
        .process_group(0)
        .spawn()
        .context("starting the supervisor")?;
    let pid = i32::try_from(child.id()).unwrap_or(0);
    // The child is not waited on: it outlives this process by design. Reaped by init.
    drop(child);
    progress.report(&format!(
        "supervisor started under its keeper (pid {pid}, log {})",
        env.paths.supervisor_log().display()
    ));
    let status = wait_ready(env, pid, progress).await?;
    Ok(UpOutcome::Started(status))
}

use std::os::unix::process::CommandExt as _;

/// The command running rigger's `command` (`keep`, `supervise`) for environment `env_name`.
pub fn rigger_command(
    rigger: &Path,
    config_path: &Path,
    env_name: &str,
    command: &str,
) -> std::process::Command {
    let mut run = std::process::Command::new(rigger);
    run.arg("--config")
        .arg(config_path)
        .args(["-e", env_name, "-v", command]);
    run
}

/// How many steps the plan for `env` has (0: the environment matches rigger.toml).
fn pending_changes(env: &LocalEnvironment) -> anyhow::Result<usize> {
    let release = crate::registry::Registry::load(&env.paths.registry())?
        .current_release
        .unwrap_or_else(|| rigger_plan::deploys::INITIAL_RELEASE.to_owned());
    let topology = rigger_topology::desired(&env.config, &env.name, &release)?;
    let plan = rigger_plan::plan(&crate::observe::observe(env, &topology), &topology);
    Ok(plan
        .steps
        .iter()
        .filter(|step| step.action != rigger_plan::Action::NoOp)
        .count())
}

/// Waits for the supervisor `pid` to report the environment ready: the engine's wait
/// ([`rigger_engine::ready`]) over its `status.json`.
async fn wait_ready(
    env: &LocalEnvironment,
    pid: i32,
    progress: &dyn Progress,
) -> anyhow::Result<Status> {
    use rigger_engine::ready::{self, NotReady, ReadySettings};
    let settings = ReadySettings {
        poll: Duration::from_millis(200),
        timeout: UP_TIMEOUT,
    };
    match ready::wait_until_ready(&mut Supervised { env, pid }, &settings, progress).await {
        Ok(status) => Ok(status),
        Err(NotReady::Failed(message)) => bail!(
            "the environment did not come up: {message}\n(supervisor log: {})",
            env.paths.supervisor_log().display()
        ),
        Err(NotReady::TimedOut {
            seconds,
            waiting_for,
        }) => bail!("the environment was not ready after {seconds} s: {waiting_for}"),
        Err(error @ (NotReady::Gone(_) | NotReady::Provider(_))) => bail!("{error}"),
    }
}

/// The environment as its supervisor `pid` reports it in `status.json`.
struct Supervised<'a> {
    env: &'a LocalEnvironment,
    pid: i32,
}

impl rigger_engine::ready::ReadySource for Supervised<'_> {
    type Error = anyhow::Error;

    /// A status written by an earlier supervisor is not this one's: `pid` is the supervisor,
    /// or the keeper whose child it is.
    async fn status(&mut self) -> anyhow::Result<Option<Status>> {
        Ok(
            crate::status::load(&self.env.paths.status()).filter(|status| {
                status.supervisor_pid.is_some_and(|pid| {
                    pid == self.pid || crate::process::parent_of(pid) == Some(self.pid)
                })
            }),
        )
    }

    async fn gone(&mut self) -> Option<String> {
        (!crate::process::is_running(self.pid)).then(|| {
            let tail = process::log_tail(&self.env.paths.supervisor_log(), 15).join("\n  ");
            format!(
                "the supervisor exited before the environment was ready; its log ends with:\n  {tail}"
            )
        })
    }

    /// The supervisor narrates its bring-up in its status's message.
    fn waiting_for(&self, status: &Status) -> String {
        status.message.clone()
    }
}

/// The parent of process `pid`, from `/proc`.
/// Stops everything the environment runs. With `purge`, also deletes its data and secrets.
pub async fn down(
    env: &LocalEnvironment,
    purge: bool,
    progress: &dyn Progress,
) -> anyhow::Result<()> {
    // The keeper is asked, not the supervisor: told to stop, it passes the signal on and does
    // not start the supervisor again, even one killed while it stops.
    let keeper = crate::keeper::stop(env)?;
    if let Some(holder) = supervisor::lock_holder(env) {
        progress.report(&format!(
            "stopping the supervisor (pid {}) and every service",
            holder.pid
        ));
        if keeper.is_none() {
            kill(Pid::from_raw(holder.pid), Signal::SIGTERM)
                .context("signalling the supervisor")?;
        }
    }
    if keeper.is_some() || supervisor::lock_holder(env).is_some() {
        poll_until(
            Duration::from_secs(180),
            || supervisor::lock_holder(env).is_none() && crate::keeper::running(env).is_none(),
            || {
                let who = supervisor::lock_holder(env)
                    .map_or_else(|| "its keeper".to_owned(), |h| format!("pid {}", h.pid));
                anyhow!("the supervisor ({who}) did not stop within 180 s")
            },
        )
        .await?;
    }
    // Whatever a killed supervisor left behind.
    for (name, outcome) in
        process::stop_leftovers(&env.paths.servers(), Duration::from_secs(60)).await
    {
        progress.report(&format!(
            "stopped {name} left by an earlier supervisor ({outcome:?})"
        ));
    }
    let _ = std::fs::remove_file(env.paths.status());
    if purge && env.paths.root().exists() {
        std::fs::remove_dir_all(env.paths.root())
            .with_context(|| format!("deleting {}", env.paths.root().display()))?;
        progress.report(&format!(
            "deleted {} (data, secrets, logs)",
            env.paths.root().display()
        ));
    }
    Ok(())
}

/// The environment's status, with replication measured now. `None` when it is not running.
pub async fn status(env: &LocalEnvironment) -> Option<Status> {
    supervisor::lock_holder(env)?;
    let mut status = crate::status::load(&env.paths.status())?;
    status.replication = replication(env).await;
    // Read now: the supervisor's snapshot may predate the last `rigger maintenance`.
    status.maintenance = env.maintenance_on();
    status.supervisor_restarts =
        crate::keeper::running(env).map(|keeper| rigger_plan::status::SupervisorRestarts {
            count: keeper.restarts,
            last_why: keeper.last_restart.as_ref().map(|r| r.why.clone()),
            last_at: keeper.last_restart.map(|r| r.at),
        });
    Some(status)
}

/// The status of an environment whose supervisor does not run.
pub fn down_status(env: &LocalEnvironment) -> Status {
    Status {
        schema: rigger_plan::status::SCHEMA.into(),
        version: rigger_plan::status::SCHEMA_VERSION,
        project: env.config.project.name.clone(),
        environment: env.name.clone(),
        provider: "local".into(),
        phase: Phase::Down,
        message: "no supervisor runs (run `rigger up`)".into(),
        release: String::new(),
        urls: Vec::new(),
        supervisor_pid: None,
        supervisor_restarts: None,
        maintenance: env.maintenance_on(),
        groups: Vec::new(),
        servers: Vec::new(),
        replication: Vec::new(),
        updated: rigger_engine::clock::unix_now(),
    }
}

/// Each replica's state and lag as the primary sees it ([`REPLICATION_STATUS_SQL`]), for
/// `rigger status`; nothing when the primary does not answer within 5 s.
async fn replication(env: &LocalEnvironment) -> Vec<ReplicaStatus> {
    // The primary the registry names: after a failover it is the promoted replica.
    let Ok(registry) = crate::registry::Registry::load(&env.paths.registry()) else {
        return Vec::new();
    };
    let Some(primary) = env.server_with_role(&registry, rigger_recipes::Role::DbPrimary) else {
        return Vec::new();
    };
    let asked = tokio::time::timeout(
        Duration::from_secs(5),
        crate::on_server::psql(env, &primary.id, REPLICATION_STATUS_SQL),
    )
    .await;
    let Ok(Ok(rows)) = asked else {
        return Vec::new();
    };
    parse_replicas(&rows)
        .into_iter()
        .map(|r| ReplicaStatus {
            id: r.id,
            state: r.state,
            lag_bytes: r.lag_bytes,
            lag_seconds: r.lag_seconds,
        })
        .collect()
}

/// How `rigger scale` waits on this machine: a new server starts, answers its health check
/// and joins the load balancer within seconds; the bound leaves room for a loaded machine.
pub const SCALE: rigger_engine::scale::ScaleSettings = rigger_engine::scale::ScaleSettings {
    poll: Duration::from_millis(500),
    timeout: Duration::from_secs(300),
};

/// `rigger scale`: the engine's flow ([`rigger_engine::scale`]) over [`LocalGroups`].
pub async fn scale(
    env: &LocalEnvironment,
    counts: &[(String, u32)],
    progress: &dyn Progress,
) -> Result<(), rigger_engine::scale::ScaleError<anyhow::Error>> {
    rigger_engine::scale::scale(
        &mut LocalGroups { env },
        env.env(),
        counts,
        &SCALE,
        progress,
    )
    .await
}

/// The local groups as `rigger scale` drives them: the counts in `desired.json`, which the
/// supervisor reads again on SIGHUP (or at its next start when the environment is down).
pub struct LocalGroups<'a> {
    pub env: &'a LocalEnvironment,
}

impl rigger_engine::scale::ScaleTarget for LocalGroups<'_> {
    type Error = anyhow::Error;

    async fn lock_holder(&mut self) -> anyhow::Result<Option<rigger_plan::deploys::LockHolder>> {
        Ok(crate::deploy::live_lock_holder(
            &self.env.paths,
            rigger_engine::clock::unix_now(),
        ))
    }

    async fn set_desired(&mut self, group: rigger_recipes::Role, count: u32) -> anyhow::Result<()> {
        let mut counts = DesiredCounts::load(&self.env.paths.desired())?;
        match group {
            rigger_recipes::Role::Web => counts.web = Some(count),
            _ => counts.worker = Some(count),
        }
        self.env.paths.create_root()?;
        counts.save(&self.env.paths.desired())?;
        if let Some(holder) = supervisor::lock_holder(self.env) {
            kill(Pid::from_raw(holder.pid), Signal::SIGHUP).context("signalling the supervisor")?;
        }
        Ok(())
    }

    /// The supervisor's own status (without asking the primary about replication, as
    /// `rigger status` does: the groups are all this waits on).
    async fn status(&mut self) -> anyhow::Result<Status> {
        let running = supervisor::lock_holder(self.env).is_some();
        Ok(running
            .then(|| crate::status::load(&self.env.paths.status()))
            .flatten()
            .unwrap_or_else(|| down_status(self.env)))
    }
}

/// What `rigger deploy` and `rigger rollback` ask for.
#[derive(Debug, Clone)]
pub struct DeployOptions {
    pub batch: String,
    pub health_timeout: Duration,
    pub worker_stop_timeout: Duration,
    pub drain_timeout: Duration,
}

/// Which release to roll out.
#[derive(Debug, Clone)]
pub enum DeployTarget {
    /// Build one from a git revision (default HEAD).
    Build {
        revision: Option<String>,
        allow_dirty: bool,
    },
    /// An existing release, by id, without rebuilding it.
    Existing(String),
    /// The release before the current one.
    Previous,
}

/// Builds (or picks) a release and has the supervisor roll it out under the deploy lock.
pub async fn deploy(
    env: &LocalEnvironment,
    target: DeployTarget,
    options: &DeployOptions,
    progress: &dyn Progress,
) -> anyhow::Result<crate::deploy::DeployOutcome> {
    use crate::deploy::{self as deploy_files, DeployLock, DeployRequest};
    use crate::release;
    let holder = running_supervisor(env).await?;
    rigger_engine::rollout::BatchSize::from_str(&options.batch).map_err(anyhow::Error::msg)?;
    let now = rigger_engine::clock::unix_now();
    let description = match &target {
        DeployTarget::Build { revision, .. } => {
            format!("deploy {}", revision.as_deref().unwrap_or("HEAD"))
        }
        DeployTarget::Existing(id) => format!("rollback to {id}"),
        DeployTarget::Previous => "rollback to the previous release".into(),
    };
    let lock = DeployLock::acquire(&env.paths, &description, now)?;
    let release = match target {
        DeployTarget::Build {
            revision,
            allow_dirty,
        } => {
            progress.report("building the release (code, locked requirements)");
            release::build(env, revision.as_deref(), allow_dirty, now)
                .await?
                .id
        }
        DeployTarget::Existing(id) => {
            let id = rollback_target(env, Some(&id))?;
            release::ReleaseManifest::load(&env.paths, &id)?.id
        }
        DeployTarget::Previous => rollback_target(env, None)?,
    };
    progress.report(&format!("rolling out release {release}"));
    let request = DeployRequest {
        id: request_id(),
        release,
        batch: options.batch.clone(),
        health_timeout_secs: options.health_timeout.as_secs(),
        worker_stop_timeout_secs: options.worker_stop_timeout.as_secs(),
        drain_timeout_secs: options.drain_timeout.as_secs(),
        requested_by: release::who(),
    };
    // A damaged answer file would stop the wait below after the request went: refused now,
    // before anything is asked.
    deploy_files::read_outcome(&env.paths)?;
    deploy_files::write_request(&env.paths, &request)?;
    kill(Pid::from_raw(holder.pid), Signal::SIGUSR1).context("signalling the supervisor")?;
    let dead = "the supervisor exited during the deploy; `rigger up` restarts it (servers of an \
                unfinished release are rolled back to the group's release)";
    await_outcome(env, holder.pid, &lock, dead, progress, || {
        answer_to(
            deploy_files::read_outcome(&env.paths),
            |outcome| outcome.request == request.id,
            &deploy_files::request_path(&env.paths),
        )
    })
    .await
}

/// A unique id for a request to the supervisor.
fn request_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

/// The supervisor's answer to the request at `request` once `outcome` (the outcome file) is
/// it. A damaged outcome, or a request the supervisor could not read (it sets a damaged one
/// aside), is an error naming the file: waiting would never end.
fn answer_to<T>(
    outcome: std::io::Result<Option<T>>,
    is_the_answer: impl Fn(&T) -> bool,
    request: &std::path::Path,
) -> anyhow::Result<Option<T>> {
    if let Some(outcome) = outcome?.filter(is_the_answer) {
        return Ok(Some(outcome));
    }
    let aside = crate::files::damaged_path(request);
    if !request.exists() && aside.exists() {
        bail!(
            "the supervisor could not read the request {} and set it aside as {} (the \
             supervisor's log says why); nothing was done: run the command again",
            request.display(),
            aside.display()
        );
    }
    Ok(None)
}

/// Waits for the supervisor's answer to a request, narrating its status messages and a lost
/// lock (the lock renews itself); fails with `dead` if the supervisor exits first.
async fn await_outcome<T>(
    env: &LocalEnvironment,
    supervisor_pid: i32,
    lock: &crate::deploy::DeployLock,
    dead: &str,
    progress: &dyn Progress,
    outcome: impl Fn() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let mut last_message = String::new();
    let mut told_lost = false;
    loop {
        if let Some(outcome) = outcome()? {
            return Ok(outcome);
        }
        if let Some(status) = crate::status::load(&env.paths.status())
            && status.message != last_message
        {
            progress.report(&status.message);
            last_message = status.message;
        }
        if !crate::process::is_running(supervisor_pid) {
            bail!("{dead}");
        }
        if !told_lost && let Some(lost) = lock.lost() {
            progress.report(&format!("warning: {lost}"));
            told_lost = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

use std::str::FromStr as _;

/// The release a rollback goes to ([`rigger_plan::deploys::rollback_target`], the rule both
/// providers share): `to`, or the one that ran before the current one.
fn rollback_target(env: &LocalEnvironment, to: Option<&str>) -> anyhow::Result<String> {
    let current = crate::registry::Registry::load(&env.paths.registry())?
        .current_release
        .unwrap_or_else(|| rigger_plan::deploys::INITIAL_RELEASE.to_owned());
    let history = crate::release::history(&env.paths)?;
    rigger_plan::deploys::rollback_target(&history, &current, to).map_err(anyhow::Error::msg)
}

/// `rigger maintenance on|off`: the engine's flow ([`rigger_engine::maintenance`]) over
/// [`LocalWebServers`].
pub async fn maintenance(
    env: &LocalEnvironment,
    on: bool,
    progress: &dyn Progress,
) -> Result<(), rigger_engine::maintenance::MaintenanceError<anyhow::Error>> {
    rigger_engine::maintenance::switch(&mut LocalWebServers { env }, on, progress).await
}

/// The web servers as `rigger maintenance` switches them locally: they all serve the
/// environment's one maintenance directory, so the page is its own record, and switching it
/// is the providers' one job (`operations::maintenance_line`) run once in the environment's
/// context, with the running release's own page when it has one.
pub struct LocalWebServers<'a> {
    pub env: &'a LocalEnvironment,
}

impl rigger_engine::maintenance::MaintenanceTarget for LocalWebServers<'_> {
    type Error = anyhow::Error;

    async fn record(&mut self, _on: bool) -> anyhow::Result<()> {
        Ok(())
    }

    async fn switch_web_servers(
        &mut self,
        on: bool,
    ) -> anyhow::Result<rigger_engine::maintenance::Switched> {
        let current = crate::registry::Registry::load(&self.env.paths.registry())?
            .current_release
            .unwrap_or_else(|| rigger_plan::deploys::INITIAL_RELEASE.to_owned());
        self.env.paths.create_root()?;
        let mut layout = self.env.server_layout("lb");
        layout.app_dir = self.env.paths.release(&current);
        let line = operations::maintenance_line(&layout, on);
        let switched = on_server::run_in_environment(
            self.env,
            &Job::new(operations::root_shell(&line)),
            Duration::from_secs(30),
        )
        .await
        .map(drop)
        .map_err(|error| format!("{error:#}"));
        Ok(rigger_engine::maintenance::Switched::Servers(vec![(
            "the web servers' shared page".to_owned(),
            switched,
        )]))
    }
}

/// Asks the supervisor for a database operation (`promote`, `reseed`) and waits for it.
pub async fn db_operation(
    env: &LocalEnvironment,
    operation: &str,
    server: Option<String>,
    force: bool,
    progress: &dyn Progress,
) -> anyhow::Result<crate::supervisor::database::DbOutcome> {
    use crate::supervisor::database::{self, DbRequest};
    let holder = running_supervisor(env).await?;
    // Database operations and deploys exclude each other.
    let lock = crate::deploy::DeployLock::acquire(
        &env.paths,
        &format!("db {operation}"),
        rigger_engine::clock::unix_now(),
    )?;
    let request = DbRequest {
        id: request_id(),
        operation: operation.to_owned(),
        server,
        force,
        requested_by: crate::release::who(),
    };
    database::read_outcome(&env.paths)?;
    database::write_request(&env.paths, &request)?;
    kill(Pid::from_raw(holder.pid), Signal::SIGUSR2).context("signalling the supervisor")?;
    let dead = format!("the supervisor exited during `db {operation}`; `rigger up` restarts it");
    let outcome = await_outcome(env, holder.pid, &lock, &dead, progress, || {
        answer_to(
            database::read_outcome(&env.paths),
            |outcome| outcome.request == request.id,
            &database::request_path(&env.paths),
        )
    })
    .await?;
    if outcome.succeeded && operation == "reseed" {
        // Done means a copy that follows the primary, as on AWS.
        let registry = crate::registry::Registry::load(&env.paths.registry())?;
        let (primary, replicas) = database_servers(env, &registry);
        let primary = primary.context("there is no primary")?;
        let mut view = LocalDatabases::of(env, &registry)?;
        rigger_engine::database::wait_streaming(
            &mut view,
            &primary,
            &replicas,
            Duration::from_millis(500),
            REPLICA_STREAMING_TIMEOUT,
            progress,
        )
        .await
        .map_err(|why| anyhow::anyhow!("{}, but {why}", outcome.message))?;
    }
    Ok(outcome)
}

/// How long a rebuilt replica may take to stream from the primary once it started (its base
/// backup is done by then: it has only to connect and replay what was written meanwhile).
const REPLICA_STREAMING_TIMEOUT: Duration = Duration::from_secs(120);

/// The primary and the replicas as the registry has them.
fn database_servers(
    env: &LocalEnvironment,
    registry: &crate::registry::Registry,
) -> (Option<DatabaseServer>, Vec<DatabaseServer>) {
    let known = |s: &crate::registry::ServerRecord| DatabaseServer {
        id: s.id.clone(),
        name: s.id.clone(),
    };
    let primary = env
        .server_with_role(registry, rigger_recipes::Role::DbPrimary)
        .map(known);
    let replicas = registry
        .servers
        .iter()
        .filter(|s| s.has_role(rigger_recipes::Role::DbReplica))
        .map(known)
        .collect();
    (primary, replicas)
}

/// Who supervises the environment, or an error saying it is not up: what every command that
/// asks the supervisor for something, or works on its servers, starts with.
/// When the supervisor died a moment ago and its keeper is starting the next one: waits until
/// that one holds the lock (it is this environment's supervisor, not a second to start, and
/// the one a command's request goes to).
async fn wait_for_the_keepers_supervisor(env: &LocalEnvironment) -> anyhow::Result<()> {
    poll_until(
        Duration::from_secs(30),
        || supervisor::lock_holder(env).is_some() || crate::keeper::running(env).is_none(),
        || {
            anyhow!(
                "the keeper of this environment ({}) has not started a supervisor for 30 s; \
                 `rigger down` stops it",
                env.paths.keeper().display()
            )
        },
    )
    .await
}

/// Checks `done` every 50 ms until it holds; `timed_out` says why not after `limit`.
async fn poll_until(
    limit: Duration,
    mut done: impl FnMut() -> bool,
    timed_out: impl FnOnce() -> anyhow::Error,
) -> anyhow::Result<()> {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > limit {
            return Err(timed_out());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn running_supervisor(env: &LocalEnvironment) -> anyhow::Result<supervisor::LockHolder> {
    wait_for_the_keepers_supervisor(env).await?;
    supervisor::lock_holder(env).with_context(|| {
        format!(
            "{}/{} is not up; run `rigger up` first",
            env.config.project.name, env.name
        )
    })
}

/// `rigger db status` with the engine's flow ([`rigger_engine::database::db_status`]): the
/// primary over its socket, each app server's PgBouncer over its admin console.
pub async fn db_status(env: &LocalEnvironment) -> anyhow::Result<DbStatus> {
    running_supervisor(env).await?;
    let registry = crate::registry::Registry::load(&env.paths.registry())?;
    let (primary, replicas) = database_servers(env, &registry);
    let mut view = LocalDatabases::of(env, &registry)?;
    database::db_status(&mut view, primary.as_ref(), &replicas)
        .await
        .context("asking the primary about its replicas")
}

/// The local environment's databases and pools, for [`db_status`].
struct LocalDatabases<'a> {
    env: &'a LocalEnvironment,
    /// Each web and worker server: id and address.
    app_servers: Vec<(String, String)>,
    admin_password: String,
}

impl<'a> LocalDatabases<'a> {
    fn of(
        env: &'a LocalEnvironment,
        registry: &crate::registry::Registry,
    ) -> anyhow::Result<LocalDatabases<'a>> {
        let secrets = crate::secrets::load_or_generate(&env.paths.secrets())?;
        Ok(LocalDatabases {
            env,
            app_servers: registry
                .servers
                .iter()
                .filter(|s| s.group().is_some())
                .map(|s| (s.id.clone(), s.address.to_string()))
                .collect(),
            admin_password: secrets.pgbouncer_admin_password.expose().to_owned(),
        })
    }
}

impl DatabaseView for LocalDatabases<'_> {
    type Error = anyhow::Error;

    async fn query(&mut self, server: &str, sql: &str) -> anyhow::Result<String> {
        crate::on_server::psql(self.env, server, sql).await
    }

    async fn show_pools(&mut self) -> Vec<(String, Result<String, String>)> {
        let mut answers = Vec::new();
        for (id, address) in &self.app_servers {
            let console =
                crate::pgbouncer::AdminConsole::of_server(address.clone(), &self.admin_password);
            let rows = console
                .run("SHOW POOLS", Duration::from_secs(10))
                .await
                .map_err(|error| format!("{error:#}"));
            answers.push((id.clone(), rows));
        }
        answers
    }
}

/// How long a `pg_dump` or `pg_restore` may take: hours for a large database, but not for ever.
const DUMP_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// `rigger db backup`: a custom-format `pg_dump` of the app's database from the primary into
/// the environment's backup directory (mode 0600), keeping the newest `keep`.
pub async fn db_backup(env: &LocalEnvironment, keep: usize) -> anyhow::Result<std::path::PathBuf> {
    running_supervisor(env).await?;
    let registry = crate::registry::Registry::load(&env.paths.registry())?;
    let primary = env
        .server_with_role(&registry, rigger_recipes::Role::DbPrimary)
        .context("there is no primary")?;
    let dir = env.paths.root().join("backups");
    crate::files::create_private_dir(&dir)?;
    let name =
        rigger_engine::backups::backup_name(&env.db_name(), rigger_engine::clock::unix_now());
    let path = dir.join(&name);
    // pg_dump (the providers' one `operations::pg_dump`, run on the primary) writes into the
    // postgres user's home there; the finished file becomes root's, 0600, and moves into the
    // backups whole (the same filesystem), so a backup cut short is never listed.
    let layout = env.server_layout(&primary.id);
    let staged = layout.home(&layout.users.postgres).join(&name);
    let dump = Job::new(operations::pg_dump(&layout, &env.db_name(), &staged));
    if let Err(error) = on_server::run(env, &primary.id, &dump, DUMP_TIMEOUT).await {
        let _ = std::fs::remove_file(&staged);
        return Err(error.context("pg_dump failed"));
    }
    let owned = std::os::unix::fs::chown(&staged, Some(0), Some(0))
        .and_then(|()| std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600)))
        .and_then(|()| std::fs::File::open(&staged)?.sync_all())
        .and_then(|()| std::fs::rename(&staged, &path));
    if let Err(error) = owned {
        let _ = std::fs::remove_file(&staged);
        return Err(
            anyhow::Error::new(error).context(format!("keeping the backup in {}", path.display()))
        );
    }
    for oldest in rigger_engine::backups::to_prune(&list_backups(env), keep) {
        let _ = std::fs::remove_file(dir.join(oldest));
    }
    Ok(path)
}

/// Backup file names, oldest first.
pub fn list_backups(env: &LocalEnvironment) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(env.paths.root().join("backups"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| rigger_engine::backups::is_backup_name(n))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `rigger db restore`: replaces the app's database with a backup, in maintenance mode.
pub async fn db_restore(env: &LocalEnvironment, backup: &str) -> anyhow::Result<()> {
    running_supervisor(env).await?;
    let path = {
        let named = env.paths.root().join("backups").join(backup);
        if named.is_file() {
            named
        } else {
            std::path::PathBuf::from(backup)
        }
    };
    anyhow::ensure!(
        path.is_file(),
        "no backup `{backup}`; `rigger db backups` lists them"
    );
    let registry = crate::registry::Registry::load(&env.paths.registry())?;
    let primary = env
        .server_with_role(&registry, rigger_recipes::Role::DbPrimary)
        .context("there is no primary")?;
    let _lock = crate::deploy::DeployLock::acquire(
        &env.paths,
        "db restore",
        rigger_engine::clock::unix_now(),
    )?;
    let was_on = env.maintenance_on();
    let silent = rigger_engine::progress::Silent;
    maintenance(env, true, &silent)
        .await
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    // A copy the postgres user can read, beside PostgreSQL on the primary, removed after.
    let layout = env.server_layout(&primary.id);
    let staged = layout
        .home(&layout.users.postgres)
        .join(format!("restore-{}", rigger_engine::clock::unix_now()));
    let restored = async {
        std::fs::copy(&path, &staged).with_context(|| format!("copying {}", path.display()))?;
        if let Some((uid, gid)) = crate::apply::owner_ids(&layout.users.postgres)? {
            std::os::unix::fs::chown(&staged, Some(uid.as_raw()), Some(gid.as_raw()))?;
        }
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        let restore = Job::new(operations::pg_restore(&layout, &env.db_name(), &staged));
        on_server::run(env, &primary.id, &restore, DUMP_TIMEOUT).await
    }
    .await;
    let _ = std::fs::remove_file(&staged);
    if !was_on {
        maintenance(env, false, &silent)
            .await
            .map_err(|error| anyhow::anyhow!("{error}"))?;
    }
    restored.with_context(|| {
        format!(
            "pg_restore failed (maintenance mode {})",
            if was_on { "still on" } else { "off again" }
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_the_outcome_of_the_request_and_a_request_set_aside_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let request = dir.path().join("request.json");
        std::fs::write(&request, "{}").unwrap();
        let ours = |outcome: &String| outcome == "ours";
        // Another request's outcome, or none yet: waiting goes on.
        assert_eq!(
            answer_to(Ok(Some("older".to_owned())), ours, &request).unwrap(),
            None
        );
        assert_eq!(answer_to(Ok(None), ours, &request).unwrap(), None);
        assert_eq!(
            answer_to(Ok(Some("ours".to_owned())), ours, &request).unwrap(),
            Some("ours".to_owned())
        );
        // A damaged outcome file: its error.
        let damaged =
            std::io::Error::new(std::io::ErrorKind::InvalidData, "outcome.json is damaged");
        let error = answer_to(Err(damaged), ours, &request).unwrap_err();
        assert_eq!(error.to_string(), "outcome.json is damaged");
        // The supervisor set the request aside: the wait ends, naming both files.
        std::fs::rename(&request, crate::files::damaged_path(&request)).unwrap();
        let error = answer_to(Ok(None), ours, &request).unwrap_err().to_string();
        assert!(
            error.contains(&format!("could not read the request {}", request.display()))
                && error.contains("request.json.damaged")
                && error.contains("run the command again"),
            "{error}"
        );
    }
}
