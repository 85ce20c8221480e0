//! `rigger validate`: parse and check the configuration, nothing else.

use crate::{Failure, Settings};

pub(crate) fn run(settings: &Settings) -> Result<(), Failure> {
    let config = super::load_config(settings)?;
    if settings.verbosity >= 0 {
        let names: Vec<&str> = config.environments.keys().map(String::as_str).collect();
        println!(
            "{} is valid: project `{}`, environments: {}",
            settings.config_path.display(),
            config.project.name,
            names.join(", ")
        );
    }
    Ok(())
}
