//! Settings resolved from the raw arguments and the environment.

use std::io::IsTerminal as _;
use std::path::PathBuf;

use crate::args::GlobalArgs;

/// Global settings every command sees.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config_path: PathBuf,
    pub environment: String,
    /// -1 quiet, 0 normal, 1+ verbose.
    pub verbosity: i8,
    /// Colour on stderr/stdout: only on a terminal, never with --no-color or NO_COLOR.
    pub color: bool,
    /// `--endpoint-url` for AWS environments.
    pub endpoint_url: Option<String>,
}

impl Settings {
    pub(crate) fn resolve(args: &GlobalArgs) -> Self {
        // Destructured so that a new global flag cannot be forgotten here.
        let GlobalArgs {
            config,
            env,
            verbose,
            quiet,
            no_color,
            endpoint_url,
        } = args;
        let no_color_env = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Settings {
            config_path: config.clone(),
            environment: env.clone(),
            verbosity: if *quiet {
                -1
            } else {
                i8::try_from(*verbose).unwrap_or(i8::MAX)
            },
            color: !no_color && !no_color_env && std::io::stderr().is_terminal(),
            endpoint_url: endpoint_url.clone(),
        }
    }

    pub(crate) fn init_logging(&self) {
        let level = match self.verbosity {
            i8::MIN..=-1 => "error",
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        };
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(self.color)
            .with_target(false)
            .try_init();
    }
}
