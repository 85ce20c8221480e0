//! `rigger plan`: the diff between the environment's live state and its configuration.

use rigger_plan::{Observed, render};

use crate::args::PlanArgs;
use crate::{Failure, Settings};

/// The release name used before the first deploy.
pub(crate) const INITIAL_RELEASE: &str = "initial";

pub(crate) fn run(args: PlanArgs, settings: &Settings) -> Result<(), Failure> {
    let PlanArgs { json } = args;
    let config = super::load_config(settings)?;
    super::environment(&config, settings)?;
    let topology = rigger_topology::desired(&config, &settings.environment, INITIAL_RELEASE)
        .map_err(|error| Failure::Usage(error.into()))?;
    // No provider observes live state yet: the plan is the diff against an empty world.
    let observed = Observed::empty();
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
