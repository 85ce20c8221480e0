//! Raw command-line arguments, as clap parses them. [`crate::settings`] turns them into the
//! settings commands use, so that no flag is silently ignored.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
    /// Run the local environment's supervisor in the foreground (`up` starts it for you).
    #[command(hide = true)]
    Supervise,
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
