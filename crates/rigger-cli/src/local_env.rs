//! Opening a local environment for a command (below the command modules): the one `-e` names,
//! refused when it is not a local one.

use anyhow::anyhow;
use rigger_config::ProviderKind;
use rigger_local::environment::LocalEnvironment;

use crate::session::{environment, load_config};
use crate::{Failure, Settings};

/// The local environment named by `-e`, or a usage error.
pub(crate) fn local_environment(settings: &Settings) -> Result<LocalEnvironment, Failure> {
    let config = load_config(settings)?;
    let env = environment(&config, settings)?;
    if env.provider_kind() != ProviderKind::Local {
        return Err(Failure::Usage(anyhow!(
            "environment `{}` uses provider `{}`, and this command is for local environments",
            env.name,
            env.provider_kind()
        )));
    }
    Ok(
        LocalEnvironment::new(config.clone(), &settings.environment, &settings.config_path)
            .expect("checked: a local environment"),
    )
}

/// The local environment with the group sizes `rigger scale` set in place of rigger.toml's
/// `desired`, as one sets an Auto Scaling group's: `plan` and `up` use those counts rather
/// than fight them (the supervisor reads them itself). A damaged `desired.json` is an error.
pub(crate) fn scaled_local_environment(settings: &Settings) -> Result<LocalEnvironment, Failure> {
    local_environment(settings)?
        .scaled()
        .map_err(|error| Failure::Operation(error.into()))
}
