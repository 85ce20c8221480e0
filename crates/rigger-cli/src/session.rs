//! What every command starts from, below the command modules: the validated configuration,
//! the environment `-e` names, the async runtime provider calls run on, and progress lines.

use anyhow::Context as _;
use rigger_config::{Config, LoadError};

use crate::{Failure, Settings};

/// The async runtime a command's provider calls run on.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .map_err(Failure::Operation)
}

/// A progress line on stderr, unless `-q`.
pub(crate) fn say(settings: &Settings, line: &str) {
    if settings.verbosity >= 0 {
        eprintln!("{line}");
    }
}

/// Loads and validates the configuration; an invalid one stops the command before anything
/// else happens.
pub(crate) fn load_config(settings: &Settings) -> Result<Config, Failure> {
    match rigger_config::load(&settings.config_path) {
        Ok(config) => Ok(config),
        Err(LoadError::Invalid(diagnostics)) => Err(Failure::Config(diagnostics.render(settings.color))),
        Err(error @ LoadError::Io { .. }) => Err(Failure::Usage(
            anyhow::Error::new(error).context("cannot read the configuration; run `rigger init` to write one, or pass --config PATH"),
        )),
    }
}

/// The environment named by `-e`, or a usage error listing the known ones.
pub(crate) fn environment<'a>(
    config: &'a Config,
    settings: &Settings,
) -> Result<&'a rigger_config::Environment, Failure> {
    config
        .environments
        .get(&settings.environment)
        .with_context(|| {
            let known: Vec<&str> = config.environments.keys().map(String::as_str).collect();
            format!(
                "no environment `{}` in {}; it defines: {} (choose one with -e)",
                settings.environment,
                settings.config_path.display(),
                known.join(", ")
            )
        })
        .map_err(Failure::Usage)
}
