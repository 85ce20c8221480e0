//! `rigger db` for AWS environments: the AWS calls are `rigger_aws::database`'s; what runs on
//! the servers (psql on a database server, PgBouncer's admin console on web and worker
//! servers, pg_dump and pg_restore) goes over SSH through `remote::run_captured`. Against an
//! emulator (`--endpoint-url`) the servers are fake addresses: every SSH step is skipped with
//! a note and only the AWS calls run. Decisions are documented in docs/aws.md ("Database
//! operations").

use anyhow::anyhow;
use rigger_aws::Provider;
use rigger_aws::database::{self, DbServer};
use rigger_engine::database::{
    self as engine_database, DatabaseServer, DatabaseView, DbReplica, DbStatus,
};
use rigger_engine::failover::{self, Failover, FailoverTarget};
use rigger_recipes::{Layout, operations, shell_quote};
use rigger_transport::Job;

use super::super::confirm;
use super::super::{report, runtime, say};
use crate::args::DbCommand;
use crate::aws_env;
use crate::fleet::{Answer, run_captured, shell_job};
use crate::{Failure, Settings};

/// The web and worker servers, whose PgBouncer and stunnel point at the databases.
const APP_SERVERS: [&str; 2] = ["web", "worker"];

pub(crate) fn run(command: DbCommand, settings: &Settings) -> Result<(), Failure> {
    let config = super::super::load_config(settings)?;
    aws_env::require_credentials(settings)?;
    let runtime = runtime()?;
    let provider = runtime.block_on(aws_env::provider(config, settings))?;
    let emulated = !runtime.block_on(aws_env::servers_are_machines(&provider))?;
    // Operations that change the databases exclude deploys and each other.
    let operation = match &command {
        DbCommand::Promote { .. } => Some("db promote"),
        DbCommand::Reseed { .. } => Some("db reseed"),
        DbCommand::Restore { .. } => Some("db restore"),
        _ => None,
    };
    let Some(operation) = operation else {
        return run_unlocked(command, settings, runtime, provider, emulated);
    };
    let report = super::report::steps(settings);
    // Renewed from a thread of its own until released, whatever becomes of this runtime.
    let lock = result_of(runtime.block_on(provider.take_lock(
        &crate::aws_env::requester(),
        operation,
        rigger_engine::clock::unix_now(),
        &report,
    )))?;
    let outcome = run_unlocked(command, settings, runtime, provider, emulated);
    let released = result_of(self::runtime()?.block_on(lock.release()));
    outcome?;
    if !released? {
        say(
            settings,
            &format!(
                "warning: the deploy lock was no longer `{operation}`'s when it ended; left to its holder"
            ),
        );
    }
    Ok(())
}

fn run_unlocked(
    command: DbCommand,
    settings: &Settings,
    runtime: tokio::runtime::Runtime,
    provider: Provider,
    emulated: bool,
) -> Result<(), Failure> {
    match command {
        DbCommand::Status { json } => status(settings, &runtime, &provider, emulated, json),
        DbCommand::Promote { replica, force } => {
            promote(settings, &runtime, &provider, replica.as_deref(), force)
        }
        DbCommand::Reseed { replica } => {
            let databases = result_of(runtime.block_on(provider.databases()))?;
            // A replica removed by an interrupted reseed is no longer listed: its name is
            // then taken as given (prepare_reseed checks it against rigger.toml).
            let name = match replica {
                Some(name) => name,
                None => databases
                    .replica(None)
                    .map_err(aws_env::failed)?
                    .name
                    .clone(),
            };
            let report = super::report::steps(settings);
            result_of(runtime.block_on(provider.prepare_reseed(&name, &report)))?;
            say(
                settings,
                &format!("rebuilding {name}: it boots with a fresh base backup of the primary"),
            );
            drop(runtime);
            super::up(settings)?;
            if emulated {
                return Ok(());
            }
            // Done means a copy that follows the primary, as locally.
            let runtime = super::runtime()?;
            let databases = result_of(runtime.block_on(provider.databases()))?;
            let primary = databases
                .primary
                .as_ref()
                .map(database_server)
                .ok_or_else(|| Failure::Operation(anyhow!("there is no primary")))?;
            let replicas: Vec<DatabaseServer> =
                databases.replicas.iter().map(database_server).collect();
            let fleet = crate::fleet::fleet(settings)?;
            let mut view = AwsDatabases {
                settings,
                provider: &provider,
                fleet: &fleet,
                promoted: None,
            };
            runtime
                .block_on(engine_database::wait_streaming(
                    &mut view,
                    &primary,
                    &replicas,
                    std::time::Duration::from_secs(2),
                    REPLICA_STREAMING_TIMEOUT,
                    &super::report::steps(settings),
                ))
                .map_err(|why| Failure::Operation(anyhow!("{name} was rebuilt, but {why}")))
        }
        DbCommand::Backup { keep } => {
            let bucket = result_of(runtime.block_on(provider.bucket()))?;
            let db = provider.env.db_name();
            let name = rigger_engine::backups::backup_name(&db, rigger_engine::clock::unix_now());
            if emulated {
                say(
                    settings,
                    &format!("  note: pg_dump skipped: {}", aws_env::EMULATED),
                );
            } else {
                let target = format!("s3://{bucket}/{}", database::backup_key(&name));
                let region = provider.env.aws().region.clone();
                remote_ok(run_captured(settings, &["db-primary".into()], &|layout| {
                    shell_job(&backup_line(layout, &db, &region, &target))
                })?)?;
            }
            let deleted = result_of(runtime.block_on(database::prune_backups(
                &provider.clients,
                &bucket,
                keep,
            )))?;
            if emulated {
                // Nothing was uploaded: no name on stdout that `restore` would not find.
                say(
                    settings,
                    &format!(
                        "no backup made; keeping the newest {keep} in s3://{bucket}/{} ({} deleted)",
                        database::BACKUP_PREFIX,
                        deleted.len()
                    ),
                );
                return Ok(());
            }
            say(
                settings,
                &format!(
                    "backup {name} in s3://{bucket}/{}; keeping the newest {keep} ({} deleted)",
                    database::BACKUP_PREFIX,
                    deleted.len()
                ),
            );
            println!("{name}");
            Ok(())
        }
        DbCommand::History { .. } => Err(Failure::Operation(anyhow!(
            "the AWS provider keeps no history of database operations yet: a failover cut off \
             half-way is recorded in SSM (`/<project>/<environment>/deploy/failover`) and \
             finished by the next `rigger db promote`; `rigger releases` lists the deploys"
        ))),
        DbCommand::Backups => {
            let bucket = result_of(runtime.block_on(provider.bucket()))?;
            for name in
                result_of(runtime.block_on(database::list_backups(&provider.clients, &bucket)))?
            {
                println!("{name}");
            }
            Ok(())
        }
        DbCommand::Restore { backup, yes } => {
            let bucket = result_of(runtime.block_on(provider.bucket()))?;
            let names =
                result_of(runtime.block_on(database::list_backups(&provider.clients, &bucket)))?;
            if !names.contains(&backup) {
                return Err(Failure::Usage(anyhow!(
                    "no backup `{backup}` in s3://{bucket}/{}; `rigger db backups -e {}` lists them",
                    database::BACKUP_PREFIX,
                    settings.environment
                )));
            }
            if !yes {
                confirm(
                    &format!(
                        "This replaces the database of {}/{} with {backup}. Type the environment's name to confirm: ",
                        provider.env.project(),
                        settings.environment
                    ),
                    &settings.environment,
                    "refusing to restore without confirmation; pass --yes",
                )?;
            }
            drop(runtime);
            // Off again whatever happened, even when turning it on failed half-way: the
            // database is either restored or as it was (pg_restore runs in one transaction).
            let restored = super::maintenance(settings, true).and_then(|()| {
                if emulated {
                    say(
                        settings,
                        &format!("  note: pg_restore skipped: {}", aws_env::EMULATED),
                    );
                    return Ok(());
                }
                let source = format!("s3://{bucket}/{}", database::backup_key(&backup));
                let db = provider.env.db_name();
                let region = provider.env.aws().region.clone();
                run_captured(settings, &["db-primary".into()], &|layout| {
                    shell_job(&restore_line(layout, &db, &region, &source))
                })
                .and_then(remote_ok)
                .map(drop)
            });
            let off = super::maintenance(settings, false);
            match (restored, off) {
                (Ok(()), off) => off?,
                (Err(error), Ok(())) => return Err(error),
                (Err(error), Err(off)) => {
                    say(
                        settings,
                        &format!(
                            "error: turning maintenance mode off: {off}; run `rigger maintenance off -e {}`",
                            settings.environment
                        ),
                    );
                    return Err(error);
                }
            }
            if emulated {
                say(
                    settings,
                    &format!("{backup} not restored (pg_restore skipped)"),
                );
                return Ok(());
            }
            say(settings, &format!("restored {backup}"));
            Ok(())
        }
    }
}

fn result_of<T>(result: Result<T, rigger_aws::AwsError>) -> Result<T, Failure> {
    result.map_err(aws_env::failed)
}

/// The answers, or a failure naming each server that failed.
fn remote_ok(answers: Vec<Answer>) -> Result<Vec<Answer>, Failure> {
    let failures = crate::fleet::failures(&answers);
    if failures.is_empty() {
        Ok(answers)
    } else {
        Err(Failure::Operation(anyhow!("{}", failures.join("\n"))))
    }
}

/// One SQL statement as the postgres superuser over the server's socket (the providers' one
/// `operations::psql`); rows `|`-separated.
fn psql_job(layout: &Layout, sql: &str) -> Job {
    Job::new(operations::psql(layout, sql))
}

/// A shell line on PgBouncer's admin console of a web or worker server (`operations`'
/// `pgbouncer_*_line`), run as root with the credentials of the root-only file the recipe
/// writes (`rigger_recipes::pgbouncer_admin_env`; never on the command line).
fn pgbouncer_job(layout: &Layout, line: &str) -> Job {
    shell_job(line).env_file(rigger_recipes::pgbouncer_admin_env(layout))
}

/// Where a backup waits on the database server between PostgreSQL and S3: the postgres
/// user's home on the data volume, under the backup's own name.
fn staged_backup(layout: &Layout, object: &str) -> std::path::PathBuf {
    let name = object.rsplit('/').next().unwrap_or(object);
    layout.home(&layout.users.postgres).join(name)
}

/// `operations::pg_dump` into the staged file, uploaded whole with the instance profile (an
/// interrupted upload leaves no object), removed after whatever happened.
fn backup_line(layout: &Layout, db: &str, region: &str, target: &str) -> String {
    let file = staged_backup(layout, target);
    let dump = Job::new(operations::pg_dump(layout, db, &file));
    format!(
        "{settings}set -e; f={file}; trap 'rm -f \"$f\"' EXIT; ({dump}); \
         aws s3 cp --only-show-errors --region {region} \"$f\" {target}",
        settings = rigger_aws::userdata::AWS_CLI_SETTINGS,
        file = shell_quote(&file.display().to_string()),
        dump = rigger_transport::wrap::remote_line(&dump, "root"),
        region = shell_quote(region),
        target = shell_quote(target),
    )
}

/// Downloads a backup beside PostgreSQL and restores it with `operations::pg_restore` (one
/// transaction: all or nothing), removing the file after whatever happened.
fn restore_line(layout: &Layout, db: &str, region: &str, source: &str) -> String {
    let file = staged_backup(layout, source);
    let restore = Job::new(operations::pg_restore(layout, db, &file));
    format!(
        "{settings}set -e; f={file}; trap 'rm -f \"$f\"' EXIT; \
         aws s3 cp --only-show-errors --region {region} {source} \"$f\"; \
         chown {pg} \"$f\"; chmod 600 \"$f\"; ({restore})",
        settings = rigger_aws::userdata::AWS_CLI_SETTINGS,
        file = shell_quote(&file.display().to_string()),
        restore = rigger_transport::wrap::remote_line(&restore, "root"),
        pg = shell_quote(&layout.users.postgres),
        region = shell_quote(region),
        source = shell_quote(source),
    )
}

/// How long a rebuilt replica may take to stream from the primary once `up` saw its boot
/// finished (its base backup is done by then).
const REPLICA_STREAMING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// A database server as the engine's flows know it: its recipe id and its name now.
fn database_server(server: &DbServer) -> DatabaseServer {
    DatabaseServer {
        id: server.id.clone(),
        name: server.name.clone(),
    }
}

fn status(
    settings: &Settings,
    runtime: &tokio::runtime::Runtime,
    provider: &Provider,
    emulated: bool,
    json: bool,
) -> Result<(), Failure> {
    let databases = result_of(runtime.block_on(provider.databases()))?;
    let primary = databases.primary.as_ref().map(database_server);
    let replicas: Vec<DatabaseServer> = databases.replicas.iter().map(database_server).collect();
    let status = if emulated {
        say(
            settings,
            &format!(
                "note: replication and PgBouncer not asked: {}",
                aws_env::EMULATED
            ),
        );
        DbStatus {
            primary: primary.map(|p| p.name),
            replicas: replicas
                .iter()
                .map(|r| DbReplica::unseen(&r.name, "unknown"))
                .collect(),
            pgbouncers: Vec::new(),
        }
    } else {
        // The servers are found once; every statement runs on them.
        let fleet = crate::fleet::fleet(settings)?;
        let mut view = AwsDatabases {
            settings,
            provider,
            fleet: &fleet,
            promoted: None,
        };
        runtime.block_on(engine_database::db_status(
            &mut view,
            primary.as_ref(),
            &replicas,
        ))?
    };
    if json {
        // The local provider's shape, plus the servers as AWS shows them.
        let encode = |e: serde_json::Error| Failure::Operation(e.into());
        let mut document = serde_json::to_value(&status).map_err(encode)?;
        document["servers"] = serde_json::to_value(&databases).map_err(encode)?;
        println!(
            "{}",
            serde_json::to_string_pretty(&document).map_err(encode)?
        );
        return Ok(());
    }
    let line = |role: &str, s: &DbServer| {
        println!(
            "{role:<8} {:<12} {:<12} {:<20} {:<10} {}",
            s.name,
            s.id,
            s.instance_id,
            s.state,
            s.address.as_deref().unwrap_or("-")
        );
    };
    if let Some(primary) = &databases.primary {
        line("primary", primary);
    } else {
        println!("primary  (none)");
    }
    for replica in &databases.replicas {
        line("replica", replica);
    }
    for fenced in &databases.fenced {
        line("fenced", fenced);
    }
    report::print_replication(&status, "replication");
    Ok(())
}

/// Promotes a replica with the engine's failover ([`rigger_engine::failover`]), the servers
/// reached over SSH ([`AwsDatabases`]). Against an emulator only the AWS half runs.
fn promote(
    settings: &Settings,
    runtime: &tokio::runtime::Runtime,
    provider: &Provider,
    replica: Option<&str>,
    force: bool,
) -> Result<(), Failure> {
    let databases = result_of(runtime.block_on(provider.databases()))?;
    let (target, primary) = failover_to(settings, runtime, provider, &databases, replica)?;
    let emulated = !runtime.block_on(aws_env::servers_are_machines(provider))?;
    let report = super::report::steps(settings);
    let (done, lost, held) = if emulated {
        say(
            settings,
            &format!(
                "  note: pausing PgBouncer, waiting for the replica, promoting it and repointing the servers skipped: {}",
                aws_env::EMULATED
            ),
        );
        let done = result_of(runtime.block_on(provider.fail_over(&target.instance_id, &report)))?;
        // PgBouncer was not paused: no writes were held.
        (done, String::new(), String::new())
    } else {
        // The servers are found once; the flow runs every step on them.
        let fleet = crate::fleet::fleet(settings)?;
        let failover = Failover {
            primary,
            replica: target.name.clone(),
            // The id comes from the instance's tags: quoted by the SQL, never trusted.
            replica_application_name: target.id.clone(),
            force,
        };
        let mut servers = AwsDatabases {
            settings,
            provider,
            fleet: &fleet,
            promoted: Some(&target),
        };
        let promoted = match runtime.block_on(failover::promote(&mut servers, &failover)) {
            Ok(promoted) => promoted,
            Err(error) => {
                if !error.changed {
                    // Refused before the promotion: nothing to finish.
                    result_of(runtime.block_on(provider.end_failover()))?;
                }
                return Err(Failure::Operation(anyhow!(error)));
            }
        };
        if !promoted.not_resumed.is_empty() {
            say(
                settings,
                &format!(
                    "warning: resuming PgBouncer failed on: {}",
                    promoted.not_resumed.join("; ")
                ),
            );
        }
        let lost = if promoted.lost.is_empty() {
            String::new()
        } else {
            format!(" ({})", promoted.lost)
        };
        let held = format!(
            "; writes held for {:.2} s",
            promoted.writes_held.as_secs_f64()
        );
        (promoted.switched, lost, held)
    };
    result_of(runtime.block_on(provider.end_failover()))?;
    let fenced = done.fenced.map_or(String::new(), |id| {
        format!("; the old primary {id} is fenced (stopped, named db-primary-old)")
    });
    say(
        settings,
        &format!(
            "{} ({}) is the primary{fenced}{lost}{held}",
            target.name, target.instance_id,
        ),
    );
    if !done.replicas_to_build.is_empty() {
        say(
            settings,
            &format!(
                "`rigger up -e {}` builds the replica{} from the new primary",
                settings.environment,
                if done.replicas_to_build.len() > 1 {
                    "s"
                } else {
                    ""
                }
            ),
        );
    }
    Ok(())
}

/// The replica a failover promotes and the primary it replaces (its name; `None` when there
/// is none to ask). A failover cut off before it finished (recorded by
/// [`Provider::begin_failover`]) is finished: its replica again, whether it is still a replica
/// or already named the primary (then there is no primary to ask: promoting is a no-op on a
/// promoted server, and the switch and repointing go on from where they stopped). Otherwise
/// the replica asked for, and the failover is recorded before anything changes.
fn failover_to(
    settings: &Settings,
    runtime: &tokio::runtime::Runtime,
    provider: &Provider,
    databases: &database::Databases,
    wanted: Option<&str>,
) -> Result<(DbServer, Option<String>), Failure> {
    let Some(promoting) = result_of(runtime.block_on(provider.unfinished_failover()))? else {
        let target = databases.replica(wanted).map_err(aws_env::failed)?.clone();
        result_of(runtime.block_on(provider.begin_failover(&target.instance_id)))?;
        let primary = databases.primary.as_ref().map(|p| p.name.clone());
        return Ok((target, primary));
    };
    let primary = databases.primary.as_ref();
    let target = primary
        .into_iter()
        .chain(&databases.replicas)
        .find(|server| server.instance_id == promoting)
        .cloned()
        .ok_or_else(|| {
            Failure::Operation(anyhow!(
                "a failover promoting {promoting} was interrupted, and that instance is no longer a database server of the environment; \
                 check `rigger db status -e {env}`, then delete the SSM parameter {parameter} and run `rigger db promote -e {env}` again",
                env = settings.environment,
                parameter = provider.env.parameter(database::FAILOVER_PARAMETER),
            ))
        })?;
    if let Some(wanted) = wanted
        && ![&target.name, &target.id, &target.instance_id].contains(&&wanted.to_owned())
    {
        return Err(Failure::Usage(anyhow!(
            "a failover to {} ({}) was interrupted: finish it first with `rigger db promote -e {}`",
            target.name,
            target.instance_id,
            settings.environment
        )));
    }
    say(
        settings,
        &format!(
            "finishing the interrupted failover to {} ({})",
            target.id, target.instance_id
        ),
    );
    let primary = primary
        .filter(|p| p.instance_id != promoting)
        .map(|p| p.name.clone());
    Ok((target, primary))
}

/// An AWS environment's database and app servers as the engine's failover drives them: SQL
/// and PgBouncer's console over SSH, the switch through the AWS API.
struct AwsDatabases<'a> {
    settings: &'a Settings,
    provider: &'a Provider,
    /// The servers as they were before the failover (the promoted one under its replica name).
    fleet: &'a crate::fleet::Fleet,
    /// The replica a failover promotes.
    promoted: Option<&'a DbServer>,
}

impl AwsDatabases<'_> {
    /// Runs the admin console line `line(layout)` on every app server's PgBouncer; the
    /// servers that failed.
    async fn pgbouncer_all(&self, line: &(dyn Fn(&Layout) -> String + Sync)) -> Vec<String> {
        let selectors: Vec<String> = APP_SERVERS.iter().map(|s| (*s).to_owned()).collect();
        match crate::fleet::run_on(self.fleet, &selectors, &|layout| {
            pgbouncer_job(layout, &line(layout))
        })
        .await
        {
            Ok(answers) => crate::fleet::failures(&answers),
            Err(failure) => vec![failure.to_string()],
        }
    }

    async fn psql(&self, server: &str, sql: &str) -> Result<String, Failure> {
        let answers = remote_ok(
            crate::fleet::run_on(self.fleet, &[server.to_owned()], &|layout| {
                psql_job(layout, sql)
            })
            .await?,
        )?;
        Ok(answers
            .first()
            .map(|a| a.stdout.join("\n"))
            .unwrap_or_default())
    }
}

impl DatabaseView for AwsDatabases<'_> {
    type Error = Failure;

    async fn query(&mut self, server: &str, sql: &str) -> Result<String, Failure> {
        self.psql(server, sql).await
    }

    async fn show_pools(&mut self) -> Vec<(String, Result<String, String>)> {
        let selectors: Vec<String> = APP_SERVERS.iter().map(|s| (*s).to_owned()).collect();
        let line = operations::pgbouncer_admin_line(&["SHOW POOLS"]);
        match crate::fleet::run_on(self.fleet, &selectors, &|layout| {
            pgbouncer_job(layout, &line)
        })
        .await
        {
            Ok(answers) => answers
                .iter()
                .map(|answer| {
                    let rows = if answer.succeeded() {
                        Ok(answer.stdout.join("\n"))
                    } else {
                        Err(answer.describe_failure())
                    };
                    (answer.server.clone(), rows)
                })
                .collect(),
            Err(failure) => vec![("(app servers)".to_owned(), Err(failure.to_string()))],
        }
    }
}

impl FailoverTarget for AwsDatabases<'_> {
    type Error = Failure;
    type Switched = database::FailedOver;

    /// Each pool's deadline (`operations::PAUSE_DEADLINE`) is armed before it pauses: should
    /// rigger die before resuming, every pool resumes by itself.
    async fn pause_pools(&mut self) -> Vec<String> {
        self.pgbouncer_all(&|layout| {
            operations::pgbouncer_pause_line(layout, operations::PAUSE_DEADLINE)
        })
        .await
    }

    async fn resume_pools(&mut self, reconnect: bool) -> Vec<String> {
        self.pgbouncer_all(&|_| operations::pgbouncer_resume_line(reconnect))
            .await
    }

    async fn query(&mut self, server: &str, sql: &str) -> Result<String, Failure> {
        self.psql(server, sql).await
    }

    /// Recorded before anything changed (`Provider::begin_failover`, in `failover_to`): the
    /// next `db promote` finishes a failover cut off at any point.
    async fn promoting(&mut self) -> Result<(), Failure> {
        Ok(())
    }

    /// The AWS half ([`Provider::fail_over`]: the old primary stopped and renamed, the
    /// promoted one given the primary's names, launch templates pointed at it), then the
    /// replication slots of the replicas `up` builds next, on the new primary.
    async fn switch(&mut self) -> Result<database::FailedOver, Failure> {
        let settings = self.settings;
        let promoted = self
            .promoted
            .ok_or_else(|| Failure::Operation(anyhow!("no replica to promote was named")))?;
        let report = super::report::steps(settings);
        let done = result_of(
            self.provider
                .fail_over(&promoted.instance_id, &report)
                .await,
        )?;
        if let Some(sql) = database::create_slots_sql(&done.replicas_to_build) {
            self.psql(&promoted.name, &sql).await?;
        }
        Ok(done)
    }

    /// Rewrites every web and worker server's stunnel.conf to point at the databases where
    /// they are now, and reloads stunnel (no app restart). Written beside, then renamed: a
    /// server never reads half a file.
    async fn repoint(&mut self) -> Result<(), Failure> {
        let provider = self.provider;
        let (network, live) = result_of(provider.observe().await)?;
        let placed =
            provider
                .env
                .with_placements(database::placements(&provider.env, &network, &live));
        let release = provider
            .current_release(&live)
            .unwrap_or_else(|| rigger_plan::deploys::INITIAL_RELEASE.to_owned());
        for server in rigger_aws::servers::servers(&provider.env, &live) {
            let role = if server.roles.iter().any(|r| r == "web") {
                rigger_recipes::Role::Web
            } else if server.roles.iter().any(|r| r == "worker") {
                rigger_recipes::Role::Worker
            } else {
                continue;
            };
            let Some(address) = &server.private_address else {
                continue;
            };
            let (path, contents) = database::stunnel_conf(
                &placed,
                &network,
                role,
                &release,
                &server.instance_id,
                address,
            )
            .map_err(aws_env::failed)?;
            let line = repoint_line(&path.display().to_string(), &contents);
            say(self.settings, &format!("  repointing {}", server.id));
            remote_ok(
                crate::fleet::run_on(self.fleet, std::slice::from_ref(&server.id), &|_| {
                    shell_job(&line)
                })
                .await?,
            )?;
        }
        Ok(())
    }

    fn report(&mut self, message: &str) {
        say(self.settings, &format!("  {message}"));
    }
}

fn repoint_line(path: &str, contents: &str) -> String {
    format!(
        "set -e; printf '%s' {contents} > {tmp}; chmod 0644 {tmp}; mv -f {tmp} {path}; systemctl reload {unit}",
        contents = shell_quote(contents),
        tmp = shell_quote(&format!("{path}.rigger-tmp")),
        path = shell_quote(path),
        unit = shell_quote(&rigger_recipes::unit_name("stunnel")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh_n(line: &str) {
        let status = std::process::Command::new("sh")
            .args(["-n", "-c", line])
            .status()
            .unwrap();
        assert!(status.success(), "sh -n rejects: {line}");
    }

    #[test]
    fn remote_lines_are_valid_shell_and_keep_secrets_out() {
        let layout = Layout::systemd("shop");
        let backup = backup_line(&layout, "shop", "us-east-1", "s3://b/backups/shop-1.dump");
        assert!(
            backup.contains("bin/pg_dump -Fc") && backup.contains("aws s3 cp"),
            "{backup}"
        );
        sh_n(&backup);
        let restore = restore_line(&layout, "shop", "us-east-1", "s3://b/backups/shop-1.dump");
        assert!(restore.contains("--single-transaction"), "{restore}");
        sh_n(&restore);
        // The admin console's password comes from rigger's admin file on the server.
        let pause = pgbouncer_job(&layout, "true");
        assert_eq!(
            pause.env_file.as_deref(),
            Some(std::path::Path::new("/etc/rigger/pgbouncer/admin.env"))
        );
        let repoint = repoint_line(
            "/etc/rigger/stunnel/stunnel.conf",
            "[shop]\nconnect = 10.0.0.1:5432\n",
        );
        assert!(
            repoint.ends_with("systemctl reload rigger-stunnel.service"),
            "{repoint}"
        );
        sh_n(&repoint);
    }
}
