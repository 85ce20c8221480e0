//! Raw command-line arguments, as clap parses them. [`crate::settings`] turns them into the
//! settings commands use, so that no flag is silently ignored.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use rigger_engine::rollout;

/// rigger builds, deploys and operates a classic Django production architecture:
/// load balancer, auto-scaled web and worker servers, Redis, RabbitMQ, and a PostgreSQL
/// primary with streaming replicas, on AWS or on this machine.
#[derive(Debug, Parser)]
#[command(name = "rigger", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Path of the configuration file.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        default_value = "rigger.toml"
    )]
    pub config: PathBuf,
    /// Environment to act on.
    #[arg(
        short = 'e',
        long = "env",
        global = true,
        value_name = "ENV",
        default_value = "local"
    )]
    pub env: String,
    /// More detail on stderr (repeat for more). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Never colour the output (the NO_COLOR environment variable does the same).
    #[arg(long, global = true)]
    pub no_color: bool,
    /// AWS environments: send every AWS call to this URL (an emulator such as moto);
    /// AWS_ENDPOINT_URL does the same.
    #[arg(long, global = true, value_name = "URL")]
    pub endpoint_url: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a commented starter rigger.toml in the current directory (or --config PATH).
    Init(InitArgs),
    /// Check the configuration and report every problem at once.
    Validate,
    /// Show what `up` would change, and why, without changing anything.
    Plan(PlanArgs),
    /// Bring the environment up (or confirm it is), and print the site's URL.
    Up,
    /// Stop everything the environment runs.
    Down(DownArgs),
    /// Servers, processes, load balancer health, URLs and replication.
    Status(StatusArgs),
    /// Change a group's desired count, e.g. `rigger scale web=3`.
    Scale(ScaleArgs),
    /// The environment's secrets (names only; values are never printed).
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// Build a release from the app's git revision and roll it out, health-gated, with an
    /// automatic rollback when the new servers are not healthy in time.
    Deploy(DeployArgs),
    /// Roll out an earlier release again, without rebuilding it.
    Rollback(RollbackArgs),
    /// The environment's deploy history.
    Releases(ReleasesArgs),
    /// The deploy lock: who holds it, or release it.
    #[command(subcommand)]
    Lock(LockCommand),
    /// Every web server answers 503 with a maintenance page (health checks stay green).
    Maintenance(MaintenanceArgs),
    /// Database operations: replication status, failover, replica reseed, backups.
    #[command(subcommand)]
    Db(DbCommand),
    /// Run the local environment's supervisor in the foreground (`up` starts it for you).
    #[command(hide = true)]
    Supervise,
    /// Run the local environment's supervisor under a keeper that starts it again should it
    /// die (`up` starts this for you).
    #[command(hide = true)]
    Keep,
    /// Run a shell command on servers in parallel, e.g. `rigger exec web -- uptime`.
    Exec(ExecArgs),
    /// Run a Django management command once, on one worker: `rigger manage -- migrate --plan`.
    Manage(ManageArgs),
    /// Show a role's logs from all its servers, merged and prefixed (`-f` to follow).
    Logs(LogsArgs),
    /// Open an interactive shell on a server.
    Ssh(SshArgs),
    /// The AWS lab: the emulator's instances booted as real machines on this one
    /// (docs/lab.md).
    Lab(LabArgs),
    /// Machine images of an AWS environment.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Bake every role's packages into an AMI (a builder instance from rigger.toml's `ami`,
    /// then CreateImage) and record it: the environment's servers launch from it from now on.
    Build(ImageBuildArgs),
}

#[derive(Debug, Args)]
pub struct ImageBuildArgs {
    /// Build a new image even when one with the same packages exists.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct DownArgs {
    /// Also delete the environment's data, logs and secrets.
    #[arg(long)]
    pub purge: bool,
    /// Do not ask for confirmation before purging.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the status as JSON (schema: docs/status-json.md).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// `GROUP=COUNT` pairs; the groups are `web` and `worker`.
    #[arg(required = true, value_name = "GROUP=COUNT")]
    pub counts: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RolloutArgs {
    /// Servers replaced at a time: a count (`2`) or a percentage of the group (`50%`).
    #[arg(long, default_value = "1")]
    pub batch: String,
    /// Seconds new servers may take to be healthy behind the load balancer before the deploy
    /// rolls back.
    #[arg(long, default_value_t = rollout::DEFAULT_HEALTH_TIMEOUT.as_secs(), value_name = "SECONDS")]
    pub health_timeout: u64,
    /// Seconds an old worker may take to finish its running tasks.
    #[arg(long, default_value_t = rollout::DEFAULT_WORKER_STOP_TIMEOUT.as_secs(), value_name = "SECONDS")]
    pub worker_stop_timeout: u64,
    /// Seconds an old web server may take to finish its requests in progress after it leaves
    /// the load balancer (locally it stops as soon as none is left).
    #[arg(long, default_value_t = rollout::DEFAULT_DRAIN_TIMEOUT.as_secs(), value_name = "SECONDS")]
    pub drain_timeout: u64,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// Git revision of the app to deploy.
    #[arg(long, default_value = None, value_name = "REV")]
    pub revision: Option<String>,
    /// Deploy the working tree even with uncommitted changes.
    #[arg(long)]
    pub allow_dirty: bool,
    #[command(flatten)]
    pub rollout: RolloutArgs,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The release to go back to (default: the one before the current).
    #[arg(long, value_name = "ID")]
    pub to: Option<String>,
    #[command(flatten)]
    pub rollout: RolloutArgs,
}

#[derive(Debug, Args)]
pub struct ReleasesArgs {
    /// Print the history as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum LockCommand {
    /// Who holds the deploy lock, since when, for what, and its id.
    Status,
    /// Remove a stale lock (expired, or its process ended on this host); with `--id`, remove
    /// that lock even while its holder runs (it is told at its next renewal).
    Release {
        /// The lock's id, as `rigger lock status` prints it: removes that lock only.
        #[arg(long, value_name = "ID")]
        id: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// The primary, each replica's state and lag, each PgBouncer's connections.
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fail over to a replica: pause writes, wait until it has replayed everything, promote
    /// it, fence the old primary, repoint every server, resume.
    Promote {
        /// The replica to promote (default: the first).
        replica: Option<String>,
        /// The primary is gone: promote without pausing or waiting (writes the replica had not
        /// received are lost; rigger says how much when it can tell).
        #[arg(long)]
        force: bool,
    },
    /// Rebuild a replica from the primary (default: the first; a new one when there is none).
    Reseed { replica: Option<String> },
    /// Dump the app's database (pg_dump, custom format) into the environment's backups.
    Backup {
        /// How many backups to keep.
        #[arg(long, default_value_t = 7)]
        keep: usize,
    },
    /// List the backups.
    Backups,
    /// The database operations performed (`promote`, `reseed`), oldest first, with how each
    /// ended: `succeeded`, `failed` or `interrupted` (its supervisor died during it).
    History {
        /// Print the history as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replace the app's database with a backup (in maintenance mode while it runs).
    Restore {
        /// A backup's name (`rigger db backups`); on the local provider also a dump's path.
        backup: String,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

#[derive(Debug, Args)]
pub struct MaintenanceArgs {
    /// `on` or `off`.
    #[arg(value_parser = ["on", "off"])]
    pub mode: String,
}

#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// List the names of the environment's secrets.
    List {
        /// Print the names as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Project name (default: the current directory's name, made valid).
    #[arg(long)]
    pub name: Option<String>,
    /// Overwrite an existing file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Print the plan as JSON (schema: docs/plan-json.md).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Roles (`web`, `worker`, `db-primary`, ...) or server ids (`web-1`); every server when
    /// none is given.
    #[arg(value_name = "ROLE|SERVER")]
    pub targets: Vec<String>,
    /// How many servers run the command at once.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..))]
    pub parallel: u16,
    /// Print the servers the command would run on and how each is reached (user, address,
    /// bastion), without connecting to any.
    #[arg(long)]
    pub list: bool,
    /// The command, after `--`; its words are joined into a shell line, as ssh does.
    #[arg(last = true, required_unless_present = "list", value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ManageArgs {
    /// The worker to run it on (default: the first in service).
    #[arg(long, value_name = "SERVER")]
    pub server: Option<String>,
    /// The arguments of `manage.py`, after `--`.
    #[arg(last = true, required = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The role (`web`, `worker`, ...) or server id whose logs to show.
    #[arg(value_name = "ROLE|SERVER")]
    pub target: String,
    /// Keep printing new lines as they are written.
    #[arg(short, long)]
    pub follow: bool,
    /// Only this service's log (`nginx`, `gunicorn`, `celery-worker`, ...).
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,
    /// How many of the last lines of each log to show first.
    #[arg(short = 'n', long, value_name = "LINES", default_value_t = 10)]
    pub lines: u32,
}

#[derive(Debug, Args)]
pub struct SshArgs {
    /// The server's id, e.g. `web-1` (`rigger status` lists them).
    #[arg(value_name = "SERVER")]
    pub server: String,
}

#[derive(Debug, Args)]
pub struct LabArgs {
    /// The lab's state directory (one lab per directory).
    #[arg(long, env = "RIGGER_LAB_DIR", value_name = "DIR", default_value = rigger_lab::layout::DEFAULT_STATE_DIR)]
    pub dir: PathBuf,
    /// Where lab images are built and cached.
    #[arg(long, env = "RIGGER_LAB_IMAGES", value_name = "DIR", default_value = rigger_lab::layout::DEFAULT_IMAGES_DIR)]
    pub images: PathBuf,
    #[command(subcommand)]
    pub command: LabCommand,
}

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Build the lab image (Debian 12, once; cached) and print its AMI id.
    Image,
    /// Start the emulator and the runner that boots its instances as machines.
    Up(LabUpArgs),
    /// Stop every machine, the runner and the emulator, and remove all the lab made.
    Down,
    /// The emulator's endpoint, the lab image's AMI, and every machine.
    Status(LabStatusArgs),
    /// Run the lab's runner in the foreground (`rigger lab up` starts it for you).
    #[command(hide = true)]
    Run,
}

#[derive(Debug, Args)]
pub struct LabUpArgs {
    /// The region whose instances become machines.
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
    /// moto's `moto_server` (default: the one scripts/moto.sh installs, else PATH's).
    #[arg(long, env = "RIGGER_LAB_EMULATOR", value_name = "PATH")]
    pub emulator: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct LabStatusArgs {
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}
