//! An environment's servers and how to reach each (below the command modules): a [`Fleet`]
//! holds, for each server, its id, roles, a [`Transport`] that reaches it and the [`Layout`]
//! of its files. A local environment's servers come from its supervisor's `status.json` and
//! are reached with `LocalTransport`; an AWS environment's from its provider
//! ([`rigger_aws::Provider::servers`]), reached over SSH as the deploy user at their public
//! address or through the configured bastion ([`ssh_targets`], a pure function), each checked
//! against the host keys it published at boot (never trusted on first sight). Commands run
//! [`Job`]s on them: [`run_on`] captures each server's answer; [`interact`] runs one with
//! this terminal.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, anyhow};
use rigger_aws::LiveServer;
use rigger_config::{AwsConfig, Config, ProviderConfig, ProviderKind};
use rigger_engine::targets::{self, Listed};
use rigger_recipes::{Command, Layout};
use rigger_transport::fanout::{self, Reporter, Task};
use rigger_transport::local::LocalTransport;
use rigger_transport::ssh::{
    HostKey, HostKeyCheck, PinnedKeys, SshSettings, SshTarget, SshTransport,
};
use rigger_transport::{BoxFuture, ExitStatus, Job, Stream, Transport, TransportError};

use crate::session::{environment, load_config, runtime, say};
use crate::{Failure, Settings};

/// The longest control directory path kept under the state directory; longer ones move to
/// the temporary directory, since a socket's path must stay under 108 bytes.
const LONGEST_CONTROL_DIR: usize = 70;

/// The servers of an environment, and how to reach each.
pub(crate) struct Fleet {
    pub(crate) environment: String,
    pub(crate) servers: Vec<Server>,
}

/// One server of the environment.
pub(crate) struct Server {
    pub(crate) id: String,
    /// Other names it answers to (an AWS server's instance id and status name, `web[1]`).
    pub(crate) aliases: Vec<String>,
    pub(crate) roles: Vec<String>,
    /// `in_service`, `pending`, `unhealthy`.
    pub(crate) state: String,
    pub(crate) transport: Arc<dyn Transport>,
    /// Where its files, logs, app and venv are, and who runs what.
    pub(crate) layout: Layout,
    /// SSH servers only: the transport again, for what only SSH has (host keys).
    pub(crate) ssh: Option<Arc<SshTransport>>,
}

/// `/bin/sh -c LINE`: what `rigger exec -- WORDS` runs, the words joined as ssh joins them.
/// A release a deploy migrates: where it is (`bucket`, `key`, in `region`), and its
/// requirements file (relative to the app, rigger.toml's `project.requirements`).
pub(crate) struct ReleaseToMigrate<'a> {
    pub bucket: &'a str,
    pub key: &'a str,
    pub region: &'a str,
    pub requirements: &'a Path,
}

/// Runs the migrations of a release once, on one worker, before any server switches: the
/// worker installs the release beside its own ([`install_for_migrations`]: its code, and a
/// venv of its own built from the release's wheels), and `manage.py migrate` runs with that
/// code and venv and the worker's environment file. Migrating with the worker's running venv
/// would run a release that adds a requirement against the old one. AWS only; called by
/// `rigger deploy`.
pub(crate) fn migrate_release(
    settings: &Settings,
    release: &ReleaseToMigrate<'_>,
) -> Result<(), Failure> {
    let fleet = fleet(settings)?;
    let server = fleet.manage_server(None)?;
    let (install, layout) = install_for_migrations(&server.layout, release);
    say(
        settings,
        &format!("installing the release on {} for its migrations", server.id),
    );
    let status = interact(server, Some(&install))?;
    if !status.success() {
        return Err(Failure::Operation(anyhow!(
            "installing the release on {} for its migrations ended with {status}; nothing was switched",
            server.id
        )));
    }
    let migrate = manage_job(&layout, &["migrate".into(), "--noinput".into()]);
    say(settings, &format!("manage.py migrate on {}", server.id));
    let status = interact(server, Some(&migrate))?;
    if status.success() {
        Ok(())
    } else {
        Err(Failure::Operation(anyhow!(
            "the migrations failed on {} ({status}); nothing was switched",
            server.id
        )))
    }
}

/// The job, run as root on a worker, that installs `release` for its migrations into
/// `migrate/` beside the app's directory (root's, like the app's; the previous deploy's copy
/// removed first): its code in `migrate/app`, its requirements from its own wheels into
/// `migrate/venv` by the build user, exactly as servers install a release at boot
/// ([`rigger_aws::userdata::INSTALL_RELEASE_FUNCTION`]). Returns the job and the layout
/// whose app and venv are that copy's.
fn install_for_migrations(layout: &Layout, release: &ReleaseToMigrate<'_>) -> (Job, Layout) {
    let top = layout
        .app_dir
        .parent()
        .unwrap_or(Path::new("/"))
        .join("migrate");
    let mut migrating = layout.clone();
    migrating.app_dir = top.join("app");
    migrating.venv_dir = top.join("venv");
    let script = format!(
        "set -euo pipefail\n{}{}\nrm -rf -- \"$1\"\ninstall -d -m 0755 -- \"$1\"\ninstall_release \"$2\" \"$3\" \"$4\" \"$1/app\" \"$1/venv\" \"$5\" \"$6\"\n",
        rigger_aws::userdata::AWS_CLI_SETTINGS,
        rigger_aws::userdata::INSTALL_RELEASE_FUNCTION.trim()
    );
    let job = Job::new(
        Command::new("/bin/bash")
            .args(["-c", &script, "rigger-install-release"])
            .arg(top.display().to_string())
            .args([release.bucket, release.key, release.region])
            .arg(release.requirements.display().to_string())
            .arg(layout.users.build.clone())
            .user("root"),
    );
    (job, migrating)
}

impl Fleet {
    /// The servers as the engine's target resolution sees them.
    pub(crate) fn listed(&self) -> Vec<Listed<'_>> {
        self.servers
            .iter()
            .map(|s| Listed {
                id: &s.id,
                aliases: &s.aliases,
                roles: &s.roles,
                state: &s.state,
            })
            .collect()
    }

    /// The servers `selectors` name (roles or ids; all when empty), in the fleet's order.
    pub(crate) fn select(&self, selectors: &[String]) -> Result<Vec<&Server>, Failure> {
        let indices =
            targets::select(&self.listed(), selectors).map_err(|e| Failure::Usage(anyhow!(e)))?;
        Ok(indices.into_iter().map(|i| &self.servers[i]).collect())
    }

    /// The server with this id.
    pub(crate) fn find(&self, id: &str) -> Result<&Server, Failure> {
        let index = targets::find(&self.listed(), id)
            .map_err(|why| Failure::Usage(anyhow!("{why} (in {})", self.environment)))?;
        Ok(&self.servers[index])
    }

    /// `--server` if given (a web or worker server), else the first worker in service.
    pub(crate) fn manage_server(&self, id: Option<&str>) -> Result<&Server, Failure> {
        let index = targets::manage_server(&self.listed(), id).map_err(|why| {
            let message = anyhow!("{}: {why}", self.environment);
            if id.is_some() {
                Failure::Usage(message)
            } else {
                Failure::Operation(message)
            }
        })?;
        Ok(&self.servers[index])
    }
}

/// The environment's servers, from its provider.
pub(crate) fn fleet(settings: &Settings) -> Result<Fleet, Failure> {
    let config = load_config(settings)?;
    let env = environment(&config, settings)?;
    match env.provider_kind() {
        ProviderKind::Local => local_fleet(settings),
        ProviderKind::Aws => aws_fleet(&config, settings),
    }
}

/// A running local environment's servers, as its supervisor last reported them.
fn local_fleet(settings: &Settings) -> Result<Fleet, Failure> {
    let env = crate::local_env::local_environment(settings)?;
    let project = &env.config.project.name;
    let not_running = || {
        Failure::Operation(anyhow!(
            "{project}/{} is not running; `rigger up -e {}` starts it",
            env.name,
            env.name
        ))
    };
    rigger_local::supervisor::lock_holder(&env).ok_or_else(not_running)?;
    let status = rigger_local::status::load(&env.paths.status()).ok_or_else(not_running)?;
    let servers = status
        .servers
        .into_iter()
        .map(|server| {
            let dir = env.paths.server(&server.id);
            let mut layout = Layout::local(&dir, env.paths.shared());
            layout.app_dir = env.paths.release(&server.release);
            layout.pki_dir = env.paths.pki();
            layout.media_root = env.paths.media();
            layout.static_root = env.paths.static_root();
            if let Some(venv) = running_venv(&dir.join("pids")) {
                layout.venv_dir = venv;
            }
            let transport = LocalTransport::new(&server.id, server.address.clone(), dir);
            Server {
                id: server.id,
                aliases: Vec::new(),
                roles: server.roles,
                state: server.state,
                transport: Arc::new(transport),
                layout,
                ssh: None,
            }
        })
        .collect();
    Ok(Fleet {
        environment: format!("{project}/{}", env.name),
        servers,
    })
}

/// The venv a local server's app processes run from: the one whose `bin/celery` or
/// `bin/gunicorn` its pid files record (the venv is named by a hash of the requirements the
/// supervisor started with, which the working tree may have changed since).
fn running_venv(pids: &Path) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(pids)
        .ok()?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "pid"))
        .collect();
    files.sort();
    files.iter().find_map(|file| {
        let record = rigger_local::process::PidRecord::read(file)?;
        let program = Path::new(&record.program);
        let name = program.file_name()?.to_str()?;
        let bin = program.parent()?;
        (matches!(name, "celery" | "gunicorn") && bin.file_name()? == "bin")
            .then(|| bin.parent().map(Path::to_path_buf))
            .flatten()
    })
}

/// A running AWS environment's servers, reached over SSH as rigger.toml says
/// (`deploy_user`, `ssh_identity`, `bastion`, `ssh_port`).
fn aws_fleet(config: &Config, settings: &Settings) -> Result<Fleet, Failure> {
    let env = environment(config, settings)?;
    let ProviderConfig::Aws(aws) = &env.provider else {
        unreachable!("an AWS environment");
    };
    let config_path = std::path::absolute(&settings.config_path)
        .with_context(|| format!("resolving {}", settings.config_path.display()))
        .map_err(Failure::Operation)?;
    let config_dir = config_path.parent().unwrap_or_else(|| Path::new("/"));
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let access = ssh_access(aws, config_dir, home.as_deref());
    if let Some(identity) = &access.identity_file
        && !identity.is_file()
    {
        return Err(Failure::Usage(anyhow!(
            "the SSH key {} (`ssh_identity` of environment `{}` in {}) does not exist; give the \
             path of the private key the servers' key pair was made from (relative to \
             rigger.toml), or leave `ssh_identity` out to use ssh-agent",
            identity.display(),
            env.name,
            settings.config_path.display()
        )));
    }
    let servers = crate::aws_env::servers(config, settings)?;
    let project = &config.project.name;
    if servers.is_empty() {
        return Err(Failure::Operation(anyhow!(
            "{project}/{} has no running server; `rigger status -e {}` shows what exists, \
             `rigger up -e {}` starts it",
            env.name,
            env.name,
            env.name
        )));
    }
    ssh_fleet(project, &env.name, ssh_targets(&env.name, servers, &access))
}

/// What every SSH connection to an AWS environment's servers shares, from rigger.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SshAccess {
    user: String,
    port: u16,
    /// `ssh_identity`, made absolute.
    identity_file: Option<PathBuf>,
    /// `bastion`, logged in to with the same identity file; its key must be recorded in
    /// rigger's known_hosts (rigger did not create it).
    bastion: Option<SshTarget>,
}

/// How to reach one server, or why it cannot be reached; from [`ssh_targets`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    id: String,
    aliases: Vec<String>,
    roles: Vec<String>,
    state: String,
    target: Result<SshTarget, Unroutable>,
}

/// A server without an address rigger can reach.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Unroutable {
    server: String,
    /// The instance id, for messages.
    instance: String,
    reason: String,
}

/// The SSH settings of an AWS environment: `ssh_identity` resolved against rigger.toml's
/// directory (`~/` against `home`), the bastion with that identity.
fn ssh_access(aws: &AwsConfig, config_dir: &Path, home: Option<&Path>) -> SshAccess {
    let identity_file =
        aws.ssh_identity
            .as_ref()
            .map(|path| match (path.strip_prefix("~"), home) {
                (Ok(rest), Some(home)) => home.join(rest),
                _ => config_dir.join(path),
            });
    let bastion = aws.bastion.as_ref().map(|b| SshTarget {
        host: b.host.clone(),
        port: b.port,
        user: b.user.clone(),
        identity_file: identity_file.clone(),
        bastion: None,
        host_keys: HostKeyCheck::Recorded,
    });
    SshAccess {
        user: aws.deploy_user.clone(),
        port: aws.ssh_port,
        identity_file,
        bastion,
    }
}

/// Each server's SSH target: the deploy user at its public address, or at its private
/// address through the bastion when there is one, checked against the host keys the server
/// published (pinned under its instance id). A server with no address is unroutable, with
/// what to set; so is one that published no readable host keys, with why.
fn ssh_targets(environment: &str, servers: Vec<LiveServer>, access: &SshAccess) -> Vec<Route> {
    servers
        .into_iter()
        .map(|server| {
            let host = match (&access.bastion, &server.public_address) {
                (Some(_), _) => server.private_address.clone().ok_or_else(|| {
                    format!(
                        "it has no private address; to reach servers at their private \
                         addresses, name a jump host in their VPC in \
                         `[environments.{environment}]`: `bastion = \"user@host\"`"
                    )
                }),
                (None, Some(public)) => Ok(public.clone()),
                (None, None) => Err(format!(
                    "it has no public address, and there is no bastion; to reach servers at \
                     their private addresses, name a jump host in their VPC in \
                     `[environments.{environment}]`: `bastion = \"user@host\"`"
                )),
            };
            let target = host
                .and_then(|host| Ok((host, pinned_keys(&server)?)))
                .map(|(host, pinned)| SshTarget {
                    host,
                    port: access.port,
                    user: access.user.clone(),
                    identity_file: access.identity_file.clone(),
                    bastion: access.bastion.clone().map(Box::new),
                    host_keys: HostKeyCheck::Pinned(pinned),
                })
                .map_err(|reason| Unroutable {
                    server: server.id.clone(),
                    instance: server.instance_id.clone(),
                    reason,
                });
            Route {
                id: server.id,
                aliases: server.aliases,
                roles: server.roles,
                state: server.state,
                target,
            }
        })
        .collect()
}

/// The host keys `server` published, pinned under its instance id; why it cannot be
/// reached when it published none or unreadable ones.
fn pinned_keys(server: &LiveServer) -> Result<PinnedKeys, String> {
    let source = format!("SSM parameter {}", server.host_keys_parameter);
    let Some(text) = &server.host_keys else {
        return Err(format!(
            "it has not published its SSH host keys ({source}), so rigger cannot tell it from \
             an impostor: a server publishes them early in its first boot, so wait until \
             `rigger status` shows it in service; one launched before rigger pinned host keys \
             never will: replace it (`rigger deploy` replaces group servers)"
        ));
    };
    HostKey::parse_all(text)
        .and_then(|keys| PinnedKeys::new(&server.instance_id, keys, &source))
        .map_err(|error| format!("its published SSH host keys ({source}) are unusable: {error}"))
}

/// The SSH settings of environment `environment` of `project`: rigger's known_hosts and the
/// control sockets under the environment's state directory (`<state>/ssh/`), or the control
/// sockets in the temporary directory when that path is too long for a socket.
fn ssh_settings(project: &str, environment: &str) -> SshSettings {
    let root = rigger_local::paths::EnvPaths::for_environment(project, environment)
        .root()
        .join("ssh");
    let mut control_dir = root.join("cm");
    if control_dir.as_os_str().len() > LONGEST_CONTROL_DIR {
        let uid = rigger_transport::local::current_user();
        let name = format!("rigger-ssh-{uid}-{project}-{environment}");
        let short: String = name.chars().take(40).collect();
        control_dir = std::env::temp_dir().join(short);
    }
    // No forget hint: the only recorded keys are the bastion's, which `ssh-keygen -R` forgets
    // (servers' keys are pinned, with nothing to forget).
    SshSettings::new(root.join("known_hosts"), control_dir)
}

/// The fleet of a provider whose servers are systemd hosts reached over SSH (AWS), in the
/// order of `routes`; an unroutable server is kept, and fails as unreachable when used.
/// Prepares the environment's SSH directories.
fn ssh_fleet(project: &str, environment: &str, routes: Vec<Route>) -> Result<Fleet, Failure> {
    let settings = ssh_settings(project, environment);
    settings
        .prepare()
        .context("preparing rigger's SSH directory")
        .map_err(Failure::Operation)?;
    // Keys pinned for servers that no longer run go (a running one's are rewritten on use).
    let running: Vec<&str> = routes
        .iter()
        .filter_map(|route| match &route.target {
            Ok(SshTarget {
                host_keys: HostKeyCheck::Pinned(pinned),
                ..
            }) => Some(pinned.alias()),
            _ => None,
        })
        .collect();
    settings
        .prune_pinned(&running)
        .context("removing the pinned host keys of servers that are gone")
        .map_err(Failure::Operation)?;
    let settings = Arc::new(settings);
    Ok(Fleet {
        environment: format!("{project}/{environment}"),
        servers: routes
            .into_iter()
            .map(|route| {
                let mut server = match route.target {
                    Ok(target) => ssh_server(
                        project,
                        &route.id,
                        route.roles,
                        &route.state,
                        target,
                        Arc::clone(&settings),
                    ),
                    Err(unroutable) => Server {
                        id: route.id,
                        aliases: Vec::new(),
                        roles: route.roles,
                        state: route.state,
                        transport: Arc::new(unroutable),
                        layout: Layout::systemd(project),
                        ssh: None,
                    },
                };
                server.aliases = route.aliases;
                server
            })
            .collect(),
    })
}

/// A server of a systemd host (AWS) reached over SSH at `target`.
pub(crate) fn ssh_server(
    project: &str,
    id: &str,
    roles: Vec<String>,
    state: &str,
    target: SshTarget,
    settings: Arc<SshSettings>,
) -> Server {
    let transport = Arc::new(SshTransport::new(id, target, settings));
    Server {
        id: id.to_owned(),
        aliases: Vec::new(),
        roles,
        state: state.to_owned(),
        transport: Arc::clone(&transport) as Arc<dyn Transport>,
        layout: Layout::systemd(project),
        ssh: Some(transport),
    }
}

/// A server rigger has no address for: every use fails as unreachable, saying why, so the
/// other servers of an `exec` still run.
impl Transport for Unroutable {
    fn server(&self) -> &str {
        &self.server
    }

    fn describe(&self) -> String {
        format!("unreachable ({})", self.reason)
    }

    fn connect(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(std::future::ready(Err(self.error())))
    }

    fn run<'a>(
        &'a self,
        _job: &'a Job,
        _output: &'a dyn rigger_transport::OutputSink,
    ) -> BoxFuture<'a, Result<ExitStatus, TransportError>> {
        Box::pin(std::future::ready(Err(self.error())))
    }

    fn copy_file<'a>(
        &'a self,
        _source: &'a Path,
        _destination: &'a Path,
        _mode: u32,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(std::future::ready(Err(self.error())))
    }

    fn interactive(&self, _job: Option<&Job>, _tty: bool) -> std::process::Command {
        // Never reached: `connect` fails first.
        std::process::Command::new("false")
    }
}

impl Unroutable {
    fn error(&self) -> TransportError {
        TransportError::Unreachable {
            server: self.server.clone(),
            address: self.instance.clone(),
            reason: self.reason.clone(),
        }
    }
}

/// Connects to `server`, then runs `job` (a shell when `None`) on this terminal.
pub(crate) fn interact(server: &Server, job: Option<&Job>) -> Result<ExitStatus, Failure> {
    let runtime = runtime()?;
    runtime
        .block_on(server.transport.connect())
        .map_err(|e| Failure::Operation(e.into()))?;
    let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let process = server.transport.interactive(job, tty);
    runtime
        .block_on(rigger_transport::run_interactive(process))
        .with_context(|| format!("starting a session on {}", server.transport.describe()))
        .map_err(Failure::Operation)
}

/// What one server answered to a job run by [`run_captured`].
#[derive(Debug)]
pub(crate) struct Answer {
    /// The server's id (`web-1`, `db-primary`).
    pub server: String,
    pub result: Result<ExitStatus, TransportError>,
    /// Its standard output and error, in order, one line each.
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

impl Answer {
    pub(crate) fn succeeded(&self) -> bool {
        matches!(&self.result, Ok(status) if status.success())
    }

    /// `web-1: exited with 1: <last stderr line>`, or the transport's error.
    pub(crate) fn describe_failure(&self) -> String {
        format!("{}: {}", self.server, self.why_failed())
    }

    /// `exited with 1: <last stderr line>`, or the transport's error.
    pub(crate) fn why_failed(&self) -> String {
        match &self.result {
            Ok(status) => format!(
                "{status}{}",
                self.stderr
                    .last()
                    .map(|l| format!(": {l}"))
                    .unwrap_or_default()
            ),
            Err(error) => error.to_string(),
        }
    }
}

/// A task's output: its standard output lines, then its standard error lines.
type CapturedLines = (Vec<String>, Vec<String>);

/// Each server that did not succeed, described (`web-1: exited with 1: <last line>`).
pub(crate) fn failures(answers: &[Answer]) -> Vec<String> {
    answers
        .iter()
        .filter(|a| !a.succeeded())
        .map(Answer::describe_failure)
        .collect()
}

/// Collects every line per task label instead of printing.
#[derive(Default)]
struct Collector {
    lines: std::sync::Mutex<std::collections::BTreeMap<String, CapturedLines>>,
}

impl Reporter for Collector {
    fn line(&self, label: &str, stream: Stream, line: &str) {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let entry = lines.entry(label.to_owned()).or_default();
        match stream {
            Stream::Stdout => entry.0.push(line.to_owned()),
            Stream::Stderr => entry.1.push(line.to_owned()),
        }
    }
}

/// Runs on each server that `selectors` names (roles or ids, as `rigger exec` takes them;
/// none: every server) the job `job` makes from the server's layout, all at once, and returns
/// each server's answer with its output, printing nothing. For commands that operate the
/// environment (maintenance, worker shutdown, database operations) rather than show output.
pub(crate) fn run_captured(
    settings: &Settings,
    selectors: &[String],
    job: &(dyn Fn(&Layout) -> Job + Sync),
) -> Result<Vec<Answer>, Failure> {
    let fleet = fleet(settings)?;
    runtime()?.block_on(run_on(&fleet, selectors, job))
}

/// [`run_captured`] on a fleet already found, from async code (a flow that runs many jobs
/// finds its servers once).
pub(crate) async fn run_on(
    fleet: &Fleet,
    selectors: &[String],
    job: &(dyn Fn(&Layout) -> Job + Sync),
) -> Result<Vec<Answer>, Failure> {
    let servers = fleet.select(selectors)?;
    let tasks: Vec<Task> = servers
        .iter()
        .map(|server| Task::new(Arc::clone(&server.transport), job(&server.layout)))
        .collect();
    let collector = Arc::new(Collector::default());
    let outcomes = fanout::run(
        tasks,
        servers.len().max(1),
        Arc::clone(&collector) as Arc<dyn Reporter>,
    )
    .await;
    let mut lines = collector.lines.lock().unwrap_or_else(|e| e.into_inner());
    Ok(outcomes
        .into_iter()
        .map(|outcome| {
            let (stdout, stderr) = lines.remove(&outcome.server).unwrap_or_default();
            Answer {
                server: outcome.server,
                result: outcome.result,
                stdout,
                stderr,
            }
        })
        .collect())
}

/// `/bin/sh -c LINE` as root (the deploy user's sudo on AWS; the local transport runs as
/// rigger's user): for operations on a server's files and services.
pub(crate) fn shell_job(line: &str) -> Job {
    Job::new(rigger_recipes::operations::root_shell(line))
}

/// The app's environment file (written by the app recipes).
pub(crate) fn app_env_file(layout: &Layout) -> PathBuf {
    layout.etc("app").join("app.env")
}

/// `manage.py ARGS` with the venv's Python, in the release's directory, as the app's user,
/// with the app's environment file and `HOME`, as the app's services run.
pub(crate) fn manage_job(layout: &Layout, args: &[String]) -> Job {
    let www = &layout.users.www;
    Job::new(
        Command::new(layout.venv_dir.join("bin/python").display().to_string())
            .arg("manage.py")
            .args(args.iter().cloned())
            .cwd(&layout.app_dir)
            .user(www.clone())
            .env("HOME", layout.home(www).display().to_string())
            .env("PYTHONUNBUFFERED", "1"),
    )
    .env_file(app_env_file(layout))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn roles(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    /// A deploy's migrations run with the new release's code and a venv built from its own
    /// wheels, installed as servers install a release at boot, never with the worker's
    /// running venv (a release adding a requirement would migrate against the old one).
    #[test]
    fn migrations_run_with_the_new_releases_code_and_venv() {
        let layout = Layout::systemd("surveys");
        let release = ReleaseToMigrate {
            bucket: "surveys-prod-releases-abc",
            key: "releases/20260101T000000Z-0123abcd.tar.gz",
            region: "eu-west-1",
            requirements: Path::new("requirements.txt"),
        };
        let (install, migrating) = install_for_migrations(&layout, &release);
        let line = rigger_transport::wrap::remote_line(&install, "admin");
        assert!(
            line.starts_with("exec sudo -n -H -u root -- /bin/bash -c "),
            "{line}"
        );
        assert!(
            line.ends_with(
                " rigger-install-release /srv/surveys/migrate surveys-prod-releases-abc releases/20260101T000000Z-0123abcd.tar.gz eu-west-1 requirements.txt rigger-build"
            ),
            "{line}"
        );
        assert!(
            line.contains(r#"install_release "$2" "$3" "$4" "$1/app" "$1/venv" "$5" "$6""#),
            "{line}"
        );
        assert!(
            line.contains(r#"--no-index --find-links "$4/wheels""#),
            "{line}"
        );
        let migrate = manage_job(&migrating, &["migrate".into(), "--noinput".into()]);
        assert_eq!(
            rigger_transport::wrap::remote_line(&migrate, "admin"),
            r#"cd /srv/surveys/migrate/app && exec sudo -n -H -u www-data -- env HOME=/var/lib/rigger/home/www-data PYTHONUNBUFFERED=1 /bin/sh -c 'set -a && . "$1" && set +a && shift && exec "$@"' rigger-env /etc/rigger/app/app.env /srv/surveys/migrate/venv/bin/python manage.py migrate --noinput"#
        );
    }

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIgKJC2VezGCTLU08GeruvaGyF60q4hSSIfqjAx6IhNr";

    /// A running server with `keys` published (`None`: none yet).
    fn live(
        id: &str,
        public: Option<&str>,
        private: Option<&str>,
        keys: Option<&str>,
    ) -> LiveServer {
        LiveServer {
            id: id.into(),
            aliases: vec![format!("i-{id}")],
            instance_id: format!("i-{id}"),
            roles: roles(&[id.split('-').next().unwrap()]),
            state: "in_service".into(),
            public_address: public.map(str::to_owned),
            private_address: private.map(str::to_owned),
            host_keys: keys.map(str::to_owned),
            host_keys_parameter: format!("/shop/prod/hostkeys/i-{id}"),
        }
    }

    fn aws_config(extra: &str) -> AwsConfig {
        let text = format!(
            "[project]\nname = \"shop\"\napp_path = \".\"\nwsgi_module = \"shop.wsgi:application\"\n\
             celery_app = \"shop\"\ndomains = [\"shop.example.com\"]\n\n[environments.prod]\n\
             provider = \"aws\"\nregion = \"us-east-1\"\nami = \"ami-12345678\"\n\
             certificate = \"arn:aws:iam::123456789012:server-certificate/x\"\n{extra}\n"
        );
        let config = rigger_config::parse(&text, "rigger.toml").unwrap();
        match &config.environments["prod"].provider {
            ProviderConfig::Aws(aws) => aws.clone(),
            ProviderConfig::Local(_) => unreachable!(),
        }
    }

    /// How a host key is checked: `pinned:ALIAS` or `recorded`.
    fn check(host_keys: &HostKeyCheck) -> String {
        match host_keys {
            HostKeyCheck::Pinned(pinned) => format!("pinned:{}", pinned.alias()),
            HostKeyCheck::Recorded => "recorded".into(),
        }
    }

    /// `id: user@host:port via bastion key=FILE keys=CHECK` or `id: unreachable (reason)`.
    fn check_targets(extra: &str, servers: Vec<LiveServer>, expected: &[&str]) {
        let access = ssh_access(
            &aws_config(extra),
            Path::new("/srv/shop"),
            Some(Path::new("/home/me")),
        );
        let lines: Vec<String> = ssh_targets("prod", servers, &access)
            .into_iter()
            .map(|route| match route.target {
                Ok(target) => format!(
                    "{}: {} key={} keys={} bastion_key={}",
                    route.id,
                    target.address(),
                    target
                        .identity_file
                        .as_deref()
                        .map_or("agent".into(), |p| p.display().to_string()),
                    check(&target.host_keys),
                    target.bastion.as_ref().map_or("-".into(), |b| format!(
                        "{:?} keys={}",
                        b.identity_file,
                        check(&b.host_keys)
                    )),
                ),
                Err(unroutable) => format!("{}: {}", route.id, unroutable.error()),
            })
            .collect();
        assert_eq!(lines, expected);
    }

    #[test]
    fn aws_servers_are_reached_as_the_deploy_user_at_their_public_address() {
        check_targets(
            "",
            vec![
                live("web-1", Some("54.1.2.3"), Some("10.0.1.5"), Some(KEY)),
                live("db-primary", None, Some("10.0.1.245"), Some(KEY)),
                live("cache", Some("54.1.2.9"), Some("10.0.1.244"), Some(KEY)),
            ],
            &[
                "web-1: admin@54.1.2.3:22 key=agent keys=pinned:i-web-1 bastion_key=-",
                "db-primary: cannot reach db-primary (i-db-primary): it has no public address, \
                 and there is no bastion; to reach servers at their private addresses, name a \
                 jump host in their VPC in `[environments.prod]`: `bastion = \"user@host\"`",
                "cache: admin@54.1.2.9:22 key=agent keys=pinned:i-cache bastion_key=-",
            ],
        );
        check_targets(
            "deploy_user = \"ubuntu\"\nssh_port = 2222\nssh_identity = \"keys/prod\"",
            vec![live("web-1", Some("54.1.2.3"), Some("10.0.1.5"), Some(KEY))],
            &[
                "web-1: ubuntu@54.1.2.3:2222 key=/srv/shop/keys/prod keys=pinned:i-web-1 bastion_key=-",
            ],
        );
    }

    #[test]
    fn behind_a_bastion_aws_servers_are_reached_at_their_private_address() {
        check_targets(
            "bastion = \"ops@bastion.example.com:2200\"\nssh_identity = \"~/.ssh/prod\"",
            vec![
                live("web-1", Some("54.1.2.3"), Some("10.0.1.5"), Some(KEY)),
                live("db-primary", None, Some("10.0.1.245"), Some(KEY)),
                live("cache", None, None, Some(KEY)),
            ],
            &[
                "web-1: admin@10.0.1.5:22 via ops@bastion.example.com:2200 \
                 key=/home/me/.ssh/prod keys=pinned:i-web-1 bastion_key=Some(\"/home/me/.ssh/prod\") keys=recorded",
                "db-primary: admin@10.0.1.245:22 via ops@bastion.example.com:2200 \
                 key=/home/me/.ssh/prod keys=pinned:i-db-primary bastion_key=Some(\"/home/me/.ssh/prod\") keys=recorded",
                "cache: cannot reach cache (i-cache): it has no private address; to reach \
                 servers at their private addresses, name a jump host in their VPC in \
                 `[environments.prod]`: `bastion = \"user@host\"`",
            ],
        );
    }

    #[test]
    fn a_server_without_published_host_keys_is_not_reached() {
        check_targets(
            "",
            vec![
                live("web-1", Some("54.1.2.3"), None, None),
                live("web-2", Some("54.1.2.4"), None, Some(&format!("* {KEY}"))),
            ],
            &[
                "web-1: cannot reach web-1 (i-web-1): it has not published its SSH host keys \
                 (SSM parameter /shop/prod/hostkeys/i-web-1), so rigger cannot tell it from an \
                 impostor: a server publishes them early in its first boot, so wait until \
                 `rigger status` shows it in service; one launched before rigger pinned host \
                 keys never will: replace it (`rigger deploy` replaces group servers)",
                "web-2: cannot reach web-2 (i-web-2): its published SSH host keys (SSM parameter \
                 /shop/prod/hostkeys/i-web-2) are unusable: `*` is not a host key algorithm (one \
                 of ssh-ed25519, ecdsa-sha2-nistp256, ecdsa-sha2-nistp384, ecdsa-sha2-nistp521, \
                 ssh-rsa, sk-ssh-ed25519@openssh.com, sk-ecdsa-sha2-nistp256@openssh.com)",
            ],
        );
    }

    #[test]
    fn an_absolute_identity_is_kept() {
        let access = ssh_access(
            &aws_config("ssh_identity = \"/etc/rigger/key\""),
            Path::new("/srv/shop"),
            None,
        );
        assert_eq!(access.identity_file, Some(PathBuf::from("/etc/rigger/key")));
    }

    #[test]
    fn ssh_settings_keep_control_sockets_short() {
        let settings = ssh_settings(&"p".repeat(60), "production");
        assert!(settings.control_dir.as_os_str().len() <= LONGEST_CONTROL_DIR);
        assert!(
            settings
                .known_hosts
                .ends_with("p".repeat(60) + "/production/ssh/known_hosts")
        );
        assert_eq!(settings.forget_hint, None);
    }
}
