//! The `rigger` command line: argument parsing, settings, one module per command, and the one
//! place where errors become messages and exit codes.
//!
//! Start at [`run`]. stdout carries data (plans, tables, JSON); progress, logs and errors go to
//! stderr. Exit codes: 0 success, 1 the operation failed, 2 the configuration or the command
//! line is wrong (nothing was changed).

mod args;
mod aws_env;
mod commands;
mod fleet;
mod local_env;
mod session;
mod settings;

use std::ffi::OsString;
use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;

pub use settings::Settings;

/// What went wrong, sorted by who can fix it.
#[derive(Debug)]
pub enum Failure {
    /// The configuration is invalid; already rendered with locations.
    Config(String),
    /// The command was asked something impossible (unknown environment, existing file...).
    Usage(anyhow::Error),
    /// The operation itself failed.
    Operation(anyhow::Error),
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Config(_) | Failure::Usage(_) => 2,
            Failure::Operation(_) => 1,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Config(rendered) => f.write_str(rendered),
            Failure::Usage(error) | Failure::Operation(error) => write!(f, "{error:#}"),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure::Operation(error)
    }
}

/// Runs rigger with `args` (the first is the program name) and returns its exit code.
pub fn run(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match args::Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => {
            // clap prints help and version to stdout with exit 0, usage errors with exit 2.
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { 2 } else { 0 });
        }
    };
    let settings = Settings::resolve(&cli.global);
    settings.init_logging();
    match commands::dispatch(cli.command, &settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            report(&failure, &settings);
            ExitCode::from(failure.exit_code())
        }
    }
}

fn report(failure: &Failure, settings: &Settings) {
    let mut stderr = std::io::stderr().lock();
    let (prefix, error) = match failure {
        Failure::Config(rendered) => {
            let _ = write!(stderr, "{rendered}");
            return;
        }
        Failure::Usage(error) | Failure::Operation(error) => ("error", error),
    };
    let prefix = if settings.color {
        format!("\x1b[1;31m{prefix}\x1b[0m")
    } else {
        prefix.to_owned()
    };
    let _ = writeln!(stderr, "{prefix}: {error}");
    for cause in error.chain().skip(1) {
        let _ = writeln!(stderr, "  caused by: {cause}");
    }
}
