//! `plan`, `up`, `down`, `status`, `scale`, `deploy`, `rollback`, `maintenance`, `releases`
//! and `lock` for environments with `provider = "aws"`: a thin layer over
//! `rigger_aws::Provider` that resolves the connection (region from rigger.toml,
//! `--endpoint-url`, the SDK's standard chain for the rest), runs it on a tokio runtime and
//! prints like the local provider does.

pub(crate) mod db;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use rigger_aws::Provider;
use rigger_aws::deploy::{
    Artifact, DeployRecord, NoServerAccess, Rollout, RolloutSettings, ServerOps,
};
use rigger_config::Config;
use rigger_engine::progress::Progress;
use rigger_engine::rollout::BatchSize;
use rigger_recipes::operations;

use super::{report, runtime, say};
use crate::args::{
    DeployArgs, DownArgs, LockCommand, MaintenanceArgs, ReleasesArgs, RollbackArgs, RolloutArgs,
    ScaleArgs, SecretsCommand, StatusArgs,
};
use crate::aws_env::{EMULATED, failed, provider, require_credentials, servers_are_machines};
use crate::fleet::Answer;
use crate::{Failure, Settings};

pub(crate) fn up(settings: &Settings) -> Result<(), Failure> {
    let config = super::load_config(settings)?;
    // An unknown environment stops here, before anything is asked of AWS.
    super::environment(&config, settings)?;
    require_credentials(settings)?;
    let started = std::time::Instant::now();
    let report = super::report::steps(settings);
    let app = app_dir(settings, &config);
    let requirements = config.project.requirements.clone();
    let status = runtime()?.block_on(async {
        let provider = provider(config, settings).await?;
        // Servers boot with the app: the first release is in the bucket before any launches.
        if provider.first_release_missing().await.map_err(failed)? {
            let build =
                tempfile::tempdir().context("making a directory to build the release in")?;
            let artifact = build_first_release(settings, &app, &requirements, build.path())
                .await
                .map_err(Failure::Operation)?;
            provider
                .upload_first_release(&artifact, &report)
                .await
                .map_err(failed)?;
        }
        let outcome = provider
            .up(rigger_plan::deploys::INITIAL_RELEASE, &report)
            .await
            .map_err(failed)?;
        let status = wait_until_ready(&provider, &report).await?;
        Ok::<_, Failure>((outcome, status))
    })?;
    let (outcome, status) = status;
    let summary = outcome.plan.summary();
    let verb = if outcome.plan.is_empty() {
        "was already up: nothing to do".to_owned()
    } else {
        format!(
            "is up ({} created, {} updated, {} replaced, {} deleted)",
            summary.create, summary.update, summary.replace, summary.delete
        )
    };
    say(
        settings,
        &format!(
            "{}/{} {verb} ({:.1} s)",
            status.project,
            status.environment,
            started.elapsed().as_secs_f64()
        ),
    );
    println!("{}", status.urls.first().map_or("", String::as_str));
    Ok(())
}

/// How long `up` waits for its servers to boot and come into service: a stock image installs
/// its packages first, and a group's health-check grace period is as long.
const READY_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// How often `up` looks while it waits.
const READY_POLL: Duration = Duration::from_secs(2);

/// Waits until the environment is ready: the engine's wait ([`rigger_engine::ready`]) over
/// the provider's status (every web server in service and, where servers are machines, every
/// boot report `finished`), failing at once when a server reports a failed boot, and after
/// [`READY_TIMEOUT`] naming the servers that are not, with where to look. The resources are
/// all made by then: waiting changes nothing, and being interrupted loses nothing.
async fn wait_until_ready(
    provider: &Provider,
    report: &dyn Progress,
) -> Result<rigger_plan::status::Status, Failure> {
    use rigger_engine::ready::{self, NotReady, ReadySettings};
    let settings = ReadySettings {
        poll: READY_POLL,
        timeout: READY_TIMEOUT,
    };
    let (project, environment) = (provider.env.project(), provider.env.name.clone());
    match ready::wait_until_ready(&mut &*provider, &settings, report).await {
        Ok(status) => Ok(status),
        // A failed boot never comes right by waiting: the server's own words, at once.
        Err(NotReady::Failed(message)) => Err(Failure::Operation(anyhow!(
            "{project}/{environment} was made, but {message}; its boot log is \
             /var/log/cloud-init-output.log (`rigger exec -e {environment} SERVER -- sudo tail -50 \
             /var/log/cloud-init-output.log`); a boot script runs once: once the cause is fixed, \
             terminate the server and `rigger up` (or its group) makes a new one"
        ))),
        Err(NotReady::TimedOut { waiting_for, .. }) => Err(Failure::Operation(anyhow!(
            "{project}/{environment} was made, but not every server came into service within {} \
             min: {waiting_for}; `rigger logs -e {environment}` and `rigger status -e {environment}` \
             show why (a server's boot log is /var/log/cloud-init-output.log)",
            READY_TIMEOUT.as_secs() / 60
        ))),
        Err(NotReady::Provider(error)) => Err(failed(error)),
        Err(error @ NotReady::Gone(_)) => Err(Failure::Operation(anyhow!("{error}"))),
    }
}

pub(crate) fn down(args: DownArgs, settings: &Settings) -> Result<(), Failure> {
    // On AWS, down deletes the data volumes and the secrets too: `--purge` is implied, and
    // the confirmation is always asked unless --yes.
    let DownArgs { purge: _, yes } = args;
    let config = super::load_config(settings)?;
    require_credentials(settings)?;
    let project = config.project.name.clone();
    if !yes {
        super::confirm(
            &format!(
                "This deletes every resource tagged {project}/{env} on AWS, the database volumes, the bucket of releases and backups, and the secrets included. Type the environment's name to confirm: ",
                env = settings.environment
            ),
            &settings.environment,
            "refusing to delete an AWS environment without confirmation; pass --yes",
        )?;
    }
    let report = super::report::steps(settings);
    let plan = runtime()?.block_on(async {
        let provider = provider(config, settings).await?;
        provider.down(&report).await.map_err(failed)
    })?;
    say(
        settings,
        &format!(
            "{project}/{} is down ({} resources deleted)",
            settings.environment,
            plan.summary().delete
        ),
    );
    Ok(())
}

pub(crate) fn status(args: StatusArgs, settings: &Settings) -> Result<(), Failure> {
    let StatusArgs { json } = args;
    let config = super::load_config(settings)?;
    require_credentials(settings)?;
    let status = runtime()?.block_on(async {
        let provider = provider(config, settings).await?;
        provider.status().await.map_err(failed)
    })?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).context("encoding the status")?
        );
        return Ok(());
    }
    print!("{}", super::render_status(&status));
    Ok(())
}

fn rollout_options(rollout: RolloutArgs) -> Result<RolloutSettings, Failure> {
    let RolloutArgs {
        batch,
        health_timeout,
        worker_stop_timeout,
        drain_timeout,
    } = rollout;
    let batch: BatchSize = batch
        .parse()
        .map_err(|e: String| Failure::Usage(anyhow!(e)))?;
    Ok(RolloutSettings {
        batch,
        health_timeout: Duration::from_secs(health_timeout),
        worker_stop_timeout: Duration::from_secs(worker_stop_timeout),
        drain_timeout: Duration::from_secs(drain_timeout),
        ..RolloutSettings::default()
    })
}

/// What a rollout does on the servers, over SSH (`remote::run_captured`).
struct SshServerOps<'a> {
    settings: &'a Settings,
    health_path: String,
}

impl SshServerOps<'_> {
    /// Runs `line` as root on `instances`. The rollout calls this from inside its async
    /// runtime, and `run_captured` runs one of its own: a thread of its own keeps them apart
    /// (the rollout waits for the answer anyway).
    fn run(&self, instances: &[String], line: &str) -> Result<Vec<Answer>, String> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    crate::fleet::run_captured(self.settings, instances, &|_| {
                        crate::fleet::shell_job(line)
                    })
                })
                .join()
        })
        .map_err(|_| "the SSH fan-out panicked".to_owned())?
        .map_err(|failure| failure.to_string())
    }
}

impl ServerOps for SshServerOps<'_> {
    fn stop_workers(&self, instances: &[String], timeout: Duration) -> Result<(), String> {
        let answers = self.run(instances, &operations::warm_stop_workers_line(timeout))?;
        let failed = crate::fleet::failures(&answers);
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }

    fn diagnose(&self, instances: &[String]) -> String {
        match self.run(
            instances,
            &operations::health_evidence_line(&self.health_path, 15),
        ) {
            Ok(answers) => answers
                .iter()
                .map(|answer| {
                    if answer.stdout.is_empty() {
                        format!(
                            "  {}: no evidence: {}",
                            answer.server,
                            answer.describe_failure()
                        )
                    } else {
                        format!("  {}: {}", answer.server, answer.stdout.join("\n  "))
                    }
                })
                .collect::<Vec<_>>()
                .join("\n"),
            Err(why) => format!("  no evidence from the servers: {why}"),
        }
    }
}

/// Rolls `started` out with SSH access to the servers (none against an emulator), and
/// reports the result as `deploy` and `rollback` print it.
fn finish(
    settings: &Settings,
    runtime: &tokio::runtime::Runtime,
    provider: &Provider,
    started: rigger_aws::deploy::StartedDeploy,
    options: RolloutSettings,
) -> Result<(), Failure> {
    let report = super::report::steps(settings);
    let ssh = SshServerOps {
        settings,
        health_path: provider.env.config.project.health_check_path.clone(),
    };
    let emulated = NoServerAccess(EMULATED);
    let servers: &dyn ServerOps = if runtime.block_on(servers_are_machines(provider))? {
        &ssh
    } else {
        &emulated
    };
    let rollout = Rollout {
        options,
        servers,
        health: None,
        report: &report,
    };
    let record = runtime
        .block_on(provider.finish_deploy(started, &rollout))
        .map_err(failed)?;
    let seconds = record.finished.saturating_sub(record.started);
    report::finished(
        settings,
        &record.release,
        &record.result,
        seconds as f64,
        &record.reason,
    )
}

/// `rigger deploy` on AWS: builds the release from git as the local provider does
/// (`rigger_local::release::resolve` and `export`), tars it, then the provider takes the lock
/// in SSM and uploads it; the migrations run once ([`migrate`]); the provider rolls out,
/// records the result and releases the lock.
pub(crate) fn deploy(args: DeployArgs, settings: &Settings) -> Result<(), Failure> {
    let DeployArgs {
        revision,
        allow_dirty,
        rollout,
    } = args;
    let options = rollout_options(rollout)?;
    let config = super::load_config(settings)?;
    require_credentials(settings)?;
    let app = app_dir(settings, &config);
    let build = tempfile::tempdir().context("making a directory to build the release in")?;
    let report = super::report::steps(settings);
    let runtime = runtime()?;
    let (provider, started) = runtime.block_on(async {
        let artifact = build_release(
            &app,
            &config.project.requirements,
            revision.as_deref(),
            allow_dirty,
            build.path(),
        )
        .await
        .map_err(Failure::Operation)?;
        say(settings, &format!("built release {}", artifact.id));
        let provider = provider(config, settings).await?;
        let started = provider
            .start_deploy(&artifact, &crate::aws_env::requester(), &report)
            .await
            .map_err(failed)?;
        Ok::<_, Failure>((provider, started))
    })?;
    if let Err(error) = migrate(settings, &runtime, &provider, &started) {
        let reason = format!("{error:?}");
        runtime
            .block_on(provider.abandon_deploy(started, &reason))
            .map_err(failed)?;
        return Err(error);
    }
    finish(settings, &runtime, &provider, started, options)
}

/// `rigger rollback` on AWS: an earlier release from the environment's bucket, rolled out
/// like a deploy, without rebuilding it and without migrations.
pub(crate) fn rollback(args: RollbackArgs, settings: &Settings) -> Result<(), Failure> {
    let RollbackArgs { to, rollout } = args;
    let options = rollout_options(rollout)?;
    let config = super::load_config(settings)?;
    require_credentials(settings)?;
    let report = super::report::steps(settings);
    let runtime = runtime()?;
    let (provider, started) = runtime.block_on(async {
        let provider = provider(config, settings).await?;
        let started = provider
            .start_rollback(to.as_deref(), &crate::aws_env::requester(), &report)
            .await
            .map_err(failed)?;
        Ok::<_, Failure>((provider, started))
    })?;
    say(
        settings,
        &format!("rolling back to release {}", started.release),
    );
    finish(settings, &runtime, &provider, started, options)
}

/// `rigger scale web=N worker=M` on AWS: each group's desired capacity, within its bounds in
/// rigger.toml; refused while a deploy holds the lock (a rollout sets the counts itself).
pub(crate) fn scale(args: ScaleArgs, settings: &Settings) -> Result<(), Failure> {
    let ScaleArgs { counts } = args;
    let config = super::load_config(settings)?;
    let counts = super::scale_counts(&counts)?;
    let env = super::environment(&config, settings)?.clone();
    // Checked before credentials are needed: a count out of bounds is a usage error anywhere.
    rigger_engine::scale::checked_counts(&env, &counts).map_err(|e| Failure::Usage(anyhow!(e)))?;
    require_credentials(settings)?;
    runtime()?.block_on(async {
        let mut provider = provider(config, settings).await?;
        report::scaled(
            rigger_engine::scale::scale(
                &mut provider,
                &env,
                &counts,
                &SCALE,
                &report::steps(settings),
            )
            .await,
        )
    })
}

/// How `rigger scale` waits on AWS: an instance boots in a minute or two, then the load
/// balancer's healthy threshold; as long as `up` waits for a whole environment.
const SCALE: rigger_engine::scale::ScaleSettings = rigger_engine::scale::ScaleSettings {
    poll: Duration::from_secs(5),
    timeout: READY_TIMEOUT,
};

/// `rigger maintenance on|off` on AWS: recorded in SSM (servers that boot meanwhile follow
/// it), then every web server switched over SSH.
/// `rigger maintenance on|off` on AWS.
pub(crate) fn maintenance_command(
    args: MaintenanceArgs,
    settings: &Settings,
) -> Result<(), Failure> {
    let MaintenanceArgs { mode } = args;
    maintenance(settings, mode == "on")?;
    report::maintenance_done(settings, &mode);
    Ok(())
}

/// `rigger releases` on AWS: the history in SSM.
pub(crate) fn releases(args: ReleasesArgs, settings: &Settings) -> Result<(), Failure> {
    report::print_releases(&history(settings)?, args.json)
}

/// `rigger secrets list` on AWS: the names of the environment's parameters.
pub(crate) fn secrets(command: SecretsCommand, settings: &Settings) -> Result<(), Failure> {
    let SecretsCommand::List { json } = command;
    report::print_secret_names(&secret_names(settings)?, json, settings)
}

pub(crate) fn maintenance(settings: &Settings, on: bool) -> Result<(), Failure> {
    let config = super::load_config(settings)?;
    require_credentials(settings)?;
    let runtime = runtime()?;
    let (provider, machines) = runtime.block_on(async {
        let provider = provider(config, settings).await?;
        let machines = servers_are_machines(&provider).await?;
        Ok::<_, Failure>((provider, machines))
    })?;
    let fleet = if machines {
        Some(crate::fleet::fleet(settings)?)
    } else {
        None
    };
    let mut web = AwsWebServers {
        provider: &provider,
        fleet: fleet.as_ref(),
    };
    runtime
        .block_on(rigger_engine::maintenance::switch(
            &mut web,
            on,
            &report::steps(settings),
        ))
        .map_err(|error| Failure::Operation(anyhow!("{error}")))
}

/// The web servers as `rigger maintenance` switches them on AWS: the mode recorded in SSM
/// (servers that boot meanwhile follow it), each running web server switched over SSH.
struct AwsWebServers<'a> {
    provider: &'a Provider,
    /// `None` when the servers are an emulator's rows, not machines.
    fleet: Option<&'a crate::fleet::Fleet>,
}

impl rigger_engine::maintenance::MaintenanceTarget for AwsWebServers<'_> {
    type Error = Failure;

    async fn record(&mut self, on: bool) -> Result<(), Failure> {
        rigger_aws::maintenance::set(&self.provider.env, &self.provider.clients, on)
            .await
            .map_err(failed)
    }

    async fn switch_web_servers(
        &mut self,
        on: bool,
    ) -> Result<rigger_engine::maintenance::Switched, Failure> {
        use rigger_engine::maintenance::Switched;
        let Some(fleet) = self.fleet else {
            return Ok(Switched::Skipped(EMULATED.to_owned()));
        };
        let answers = crate::fleet::run_on(fleet, &["web".to_owned()], &|layout| {
            crate::fleet::shell_job(&operations::maintenance_line(layout, on))
        })
        .await?;
        Ok(Switched::Servers(
            answers
                .iter()
                .map(|answer| {
                    let result = if answer.succeeded() {
                        Ok(())
                    } else {
                        Err(answer.why_failed())
                    };
                    (answer.server.clone(), result)
                })
                .collect(),
        ))
    }
}

/// The app's directory: rigger.toml's `app_path`, relative to the file.
fn app_dir(settings: &Settings, config: &Config) -> std::path::PathBuf {
    settings
        .config_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
        .join(&config.project.app_path)
}

/// The first release `up` launches the groups with ([`rigger_plan::deploys::INITIAL_RELEASE`]): the app
/// at git `HEAD`, so that what runs is a commit (uncommitted changes are left out, with a
/// warning: `rigger deploy --allow-dirty` ships them). A deploy's rules, without refusing a
/// dirty tree: nothing runs yet that a mistake could break.
async fn build_first_release(
    settings: &Settings,
    app: &Path,
    requirements: &Path,
    dir: &Path,
) -> Result<Artifact, anyhow::Error> {
    let built = build_release(app, requirements, Some("HEAD"), false, dir)
        .await
        .context("building the first release from the app's git HEAD")?;
    if rigger_local::release::has_uncommitted_changes(app).await? {
        say(
            settings,
            &format!(
                "warning: {} has uncommitted changes, which the first release leaves out (it is HEAD, {}); `rigger deploy --allow-dirty` ships them",
                app.display(),
                built.revision
            ),
        );
    }
    say(
        settings,
        &format!("built the first release from {}", built.revision),
    );
    Ok(Artifact {
        id: rigger_plan::deploys::INITIAL_RELEASE.to_owned(),
        ..built
    })
}

/// The app's tree at `revision` with a wheel for every requirement
/// ([`rigger_aws::releases::WHEELS`]), as a gzipped tarball in `dir`. A tree without
/// `manage.py` or without its requirements file (`requirements`, relative to the app) is
/// refused here: the servers could not run it.
async fn build_release(
    app: &Path,
    requirements: &Path,
    revision: Option<&str>,
    allow_dirty: bool,
    dir: &Path,
) -> anyhow::Result<Artifact> {
    let source = rigger_local::release::resolve(
        app,
        revision,
        allow_dirty,
        rigger_engine::clock::unix_now(),
    )
    .await?;
    let tree = dir.join("app");
    std::fs::create_dir_all(&tree)?;
    rigger_local::release::export(app, &source, &tree, &dir.join("build.log")).await?;
    for (file, what) in [
        (Path::new("manage.py"), "project.app_path"),
        (requirements, "project.requirements"),
    ] {
        anyhow::ensure!(
            tree.join(file).is_file(),
            "release {} ({}) has no {} in {}; check {what} in rigger.toml, and that the file is committed",
            source.id,
            source.kind,
            file.display(),
            app.display()
        );
    }
    build_wheels(&tree, requirements, dir)
        .await
        .with_context(|| format!("building release {} ({})", source.id, source.kind))?;
    let tarball = dir.join(format!("{}.tar.gz", source.id));
    let tar = tokio::process::Command::new("tar")
        .arg("-czf")
        .arg(&tarball)
        .arg("-C")
        .arg(&tree)
        .arg(".")
        .output()
        .await
        .context("running tar")?;
    anyhow::ensure!(
        tar.status.success(),
        "packing the release failed: {}",
        String::from_utf8_lossy(&tar.stderr).trim()
    );
    Ok(Artifact {
        id: source.id,
        revision: source.revision,
        tarball,
    })
}

/// Wheels for every requirement of the app tree `tree`, in its `wheels` directory, built
/// with this machine's Python for the servers' ([`rigger_aws::releases::SERVER_PYTHON`]; any
/// other is refused) by the unprivileged build user when rigger is root. pip reaches PyPI
/// here, on the operator's machine: servers install the release from these wheels alone.
async fn build_wheels(tree: &Path, requirements: &Path, dir: &Path) -> anyhow::Result<()> {
    use rigger_aws::releases::{
        SERVER_GLIBC, SERVER_MACHINE, SERVER_PYTHON, SERVER_SYSTEM, WHEELS,
    };
    let wheels = tree.join(WHEELS);
    anyhow::ensure!(
        std::fs::symlink_metadata(&wheels).is_err(),
        "the app has a `{WHEELS}` of its own ({}), where a release carries the wheels rigger builds; rename it",
        wheels.display()
    );
    // The build user traverses the build directory to the app's tree and its own work.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
    let log = dir.join("build.log");
    rigger_local::release::build_wheels(
        tree,
        requirements,
        &wheels,
        &dir.join("wheel-build"),
        rigger_local::release::WheelTarget {
            python: SERVER_PYTHON,
            machine: SERVER_MACHINE,
            glibc: SERVER_GLIBC,
            system: SERVER_SYSTEM,
        },
        &log,
    )
    .await
}

/// The migrations, once, before anything switches: over SSH on one worker. Skipped, with a
/// note, when the servers are an emulator's rows rather than machines
/// ([`servers_are_machines`]).
fn migrate(
    settings: &Settings,
    runtime: &tokio::runtime::Runtime,
    provider: &Provider,
    started: &rigger_aws::deploy::StartedDeploy,
) -> Result<(), Failure> {
    if !runtime.block_on(servers_are_machines(provider))? {
        say(settings, &format!("  note: migrations skipped: {EMULATED}"));
        return Ok(());
    }
    crate::fleet::migrate_release(
        settings,
        &crate::fleet::ReleaseToMigrate {
            bucket: &started.bucket,
            key: &rigger_aws::releases::object_key(&started.release),
            region: &provider.env.aws().region,
            requirements: &provider.env.config.project.requirements,
        },
    )
}

/// The names of the environment's secrets in SSM (`rigger secrets list`).
pub(crate) fn secret_names(settings: &Settings) -> Result<Vec<String>, Failure> {
    let config = super::load_config(settings)?;
    require_credentials(settings)?;
    runtime()?.block_on(async {
        let provider = provider(config, settings).await?;
        rigger_aws::secrets::names(&provider.env, &provider.clients)
            .await
            .map_err(failed)
    })
}

/// The deploy history in SSM.
pub(crate) fn history(settings: &Settings) -> Result<Vec<DeployRecord>, Failure> {
    let config = super::load_config(settings)?;
    require_credentials(settings)?;
    runtime()?.block_on(async {
        let provider = provider(config, settings).await?;
        rigger_aws::deploy::history(&provider.env, &provider.clients)
            .await
            .map_err(failed)
    })
}

/// `rigger lock status|release` on AWS: the lock object in the environment's bucket.
pub(crate) fn lock(command: LockCommand, settings: &Settings) -> Result<(), Failure> {
    let config = super::load_config(settings)?;
    require_credentials(settings)?;
    runtime()?.block_on(async {
        let provider = provider(config, settings).await?;
        match command {
            LockCommand::Status => {
                match rigger_aws::deploy::lock_holder(&provider.env, &provider.clients)
                    .await
                    .map_err(failed)?
                {
                    Some(holder) => println!("held by {holder}"),
                    None => println!("free"),
                }
            }
            LockCommand::Release { id } => {
                let released = rigger_aws::deploy::release_lock_by_id(
                    &provider.env,
                    &provider.clients,
                    id.as_deref(),
                    &crate::aws_env::requester(),
                    rigger_engine::clock::unix_now(),
                )
                .await
                .map_err(failed)?;
                match released {
                    Some(holder) => say(settings, &format!("released the lock held by {holder}")),
                    None => say(settings, "the lock was free"),
                }
            }
        }
        Ok(())
    })
}
