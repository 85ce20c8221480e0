//! The plan's JSON form. The schema is versioned and documented in docs/plan-json.md; bump
//! [`SCHEMA_VERSION`] on any change that could break a reader.

use serde::Serialize;

use crate::{Change, Plan, Summary};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Serialize)]
struct PlanDocument<'a> {
    schema: &'static str,
    version: u32,
    project: &'a str,
    environment: &'a str,
    release: &'a str,
    summary: Summary,
    steps: Vec<StepDocument<'a>>,
}

#[derive(Serialize)]
struct StepDocument<'a> {
    index: usize,
    kind: &'static str,
    name: &'a str,
    action: crate::Action,
    wave: Option<usize>,
    depends_on: &'a [usize],
    changes: &'a [Change],
}

/// The plan as a pretty-printed JSON document.
pub fn to_json(plan: &Plan) -> String {
    let document = PlanDocument {
        schema: "rigger.plan",
        version: SCHEMA_VERSION,
        project: &plan.project,
        environment: &plan.environment,
        release: &plan.release,
        summary: plan.summary(),
        steps: plan
            .steps
            .iter()
            .enumerate()
            .map(|(index, step)| StepDocument {
                index,
                kind: step.id.kind.as_str(),
                name: &step.id.name,
                action: step.action,
                wave: step.wave,
                depends_on: &step.depends_on,
                changes: &step.changes,
            })
            .collect(),
    };
    serde_json::to_string_pretty(&document).expect("a plan always serializes")
}
