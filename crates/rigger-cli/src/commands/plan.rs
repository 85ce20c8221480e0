//! `rigger plan`: the diff between the environment's live state and its configuration.

use rigger_config::ProviderKind;
use rigger_plan::render;

use crate::args::PlanArgs;
use crate::{Failure, Settings};

pub(crate) fn run(args: PlanArgs, settings: &Settings) -> Result<(), Failure> {
    let PlanArgs { json } = args;
    let config = super::load_config(settings)?;
    let provider = super::environment(&config, settings)?.provider_kind();
    let (observed, topology) = match provider {
        ProviderKind::Local => {
            let env = crate::local_env::scaled_local_environment(settings)?;
            // The release the environment's groups run (the last deploy's), not the first.
            let release = rigger_local::registry::Registry::load(&env.paths.registry())
                .map_err(|error| Failure::Operation(error.into()))?
                .current_release
                .unwrap_or_else(|| rigger_plan::deploys::INITIAL_RELEASE.to_owned());
            let topology = rigger_topology::desired(&env.config, &settings.environment, &release)
                .map_err(|error| Failure::Usage(error.into()))?;
            (rigger_local::observe::observe(&env, &topology), topology)
        }
        // The live state by tags, and the topology with the groups' live counts
        // (commands/aws.rs).
        ProviderKind::Aws => {
            crate::aws_env::observe(&config, settings, rigger_plan::deploys::INITIAL_RELEASE)?
        }
    };
    let plan = rigger_plan::plan(&observed, &topology);
    if json {
        println!("{}", rigger_plan::json::to_json(&plan));
    } else {
        let style = render::Style {
            color: settings.color,
            show_unchanged: settings.verbosity > 0,
        };
        print!("{}", render::human(&plan, style));
    }
    Ok(())
}
