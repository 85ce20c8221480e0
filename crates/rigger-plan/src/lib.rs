//! The planner: what must change to turn the observed world into the desired topology.
//!
//! [`plan`] is a pure function of an [`Observed`] world (what a provider found, tagged as
//! belonging to the environment) and a desired [`Topology`]. It returns a [`Plan`]: one
//! [`Step`] per resource with its [`Action`] and the reasons for it (attribute, old -> new),
//! ordered as a dependency graph whose independent steps can run in parallel ([`Step::wave`]).
//! The first creation is just the plan against an empty world, so one code path serves every
//! run, and `rigger plan`, `rigger up` and their JSON output all share this value.
//!
//! Architecture invariant: this crate does no I/O, reads no clock and cannot fail on the
//! network. Rendering lives in [`render`]; the JSON schema in [`json`].

pub mod deploys;
pub mod json;
pub mod render;
pub mod status;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rigger_topology::{OnChange, ResourceId, Topology, Value, tag};
use serde::Serialize;

/// A resource as a provider observed it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedResource {
    pub attributes: BTreeMap<String, Value>,
    pub tags: BTreeMap<String, String>,
    /// What this resource needs, as far as the provider can tell: a resource is deleted only
    /// after everything that depends on it.
    pub depends_on: BTreeSet<ResourceId>,
}

/// Everything a provider found that belongs to the environment (by its tags).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    pub resources: BTreeMap<ResourceId, ObservedResource>,
}

impl Observed {
    /// The world before the first `up`.
    pub fn empty() -> Self {
        Observed::default()
    }
}

/// The small closed set of things the planner can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Create,
    Update,
    Replace,
    Delete,
    NoOp,
}

impl Action {
    /// The familiar one-column symbol: `+`, `~`, `-/+`, `-`, or a blank for no change.
    pub fn symbol(self) -> &'static str {
        match self {
            Action::Create => "+",
            Action::Update => "~",
            Action::Replace => "-/+",
            Action::Delete => "-",
            Action::NoOp => " ",
        }
    }
}

/// One reason for an action: an attribute (or `tags.NAME`) going from `old` to `new`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub attribute: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
    /// This change alone would force the resource to be replaced.
    pub forces_replacement: bool,
}

/// What to do with one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub id: ResourceId,
    pub action: Action,
    pub changes: Vec<Change>,
    /// Indices (into [`Plan::steps`]) of the steps that must finish before this one starts.
    pub depends_on: Vec<usize>,
    /// Steps of the same wave are independent of each other; wave `n` needs only waves `< n`.
    /// `None` for no-op steps, which do not run.
    pub wave: Option<usize>,
}

/// Counts of each action, for the summary line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Summary {
    pub create: usize,
    pub update: usize,
    pub replace: usize,
    pub delete: usize,
    pub no_op: usize,
}

/// The whole plan for one environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub project: String,
    pub environment: String,
    pub release: String,
    /// Desired resources in topology order, then deletions.
    pub steps: Vec<Step>,
}

impl Plan {
    pub fn summary(&self) -> Summary {
        let mut summary = Summary::default();
        for step in &self.steps {
            *match step.action {
                Action::Create => &mut summary.create,
                Action::Update => &mut summary.update,
                Action::Replace => &mut summary.replace,
                Action::Delete => &mut summary.delete,
                Action::NoOp => &mut summary.no_op,
            } += 1;
        }
        summary
    }

    /// True when applying the plan would change nothing.
    pub fn is_empty(&self) -> bool {
        self.steps.iter().all(|step| step.action == Action::NoOp)
    }

    /// Steps to run, grouped by wave: each inner list can run in parallel.
    pub fn waves(&self) -> Vec<Vec<&Step>> {
        let mut waves: Vec<Vec<&Step>> = Vec::new();
        for step in &self.steps {
            if let Some(wave) = step.wave {
                if waves.len() <= wave {
                    waves.resize_with(wave + 1, Vec::new);
                }
                waves[wave].push(step);
            }
        }
        waves
    }
}

/// Compares `observed` with `desired` and orders what must change.
pub fn plan(observed: &Observed, desired: &Topology) -> Plan {
    let mut steps = Vec::with_capacity(desired.resources.len());
    let mut index: HashMap<&ResourceId, usize> = HashMap::with_capacity(desired.resources.len());
    for resource in &desired.resources {
        let (action, changes) = match observed.resources.get(&resource.id) {
            None => (Action::Create, creation_changes(resource)),
            Some(live) => compare(resource, live),
        };
        index.insert(&resource.id, steps.len());
        steps.push(Step {
            id: resource.id.clone(),
            action,
            changes,
            depends_on: Vec::new(),
            wave: None,
        });
    }

    // Creations and updates run after the changed resources they depend on.
    for (position, resource) in desired.resources.iter().enumerate() {
        if steps[position].action == Action::NoOp {
            continue;
        }
        let mut needs: Vec<usize> = resource
            .depends_on
            .iter()
            .filter_map(|dependency| index.get(dependency).copied())
            .filter(|&dependency| steps[dependency].action != Action::NoOp)
            .collect();
        needs.sort_unstable();
        steps[position].depends_on = needs;
    }

    // Deletions: whatever was observed and is no longer desired, removed only after everything
    // that depends on it has been removed or replaced.
    let first_deletion = steps.len();
    for (id, live) in &observed.resources {
        if index.contains_key(id) {
            continue;
        }
        let changes = live
            .attributes
            .iter()
            .map(|(name, value)| Change {
                attribute: name.clone(),
                old: Some(value.clone()),
                new: None,
                forces_replacement: false,
            })
            .collect();
        index.insert(id, steps.len());
        steps.push(Step {
            id: id.clone(),
            action: Action::Delete,
            changes,
            depends_on: Vec::new(),
            wave: None,
        });
    }
    let mut deletion_needs: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for position in first_deletion..steps.len() {
        let live = &observed.resources[&steps[position].id];
        for dependency in &live.depends_on {
            let Some(&target) = index.get(dependency) else {
                continue;
            };
            if matches!(steps[target].action, Action::Delete | Action::Replace) {
                // The dependency's removal waits for this dependent's deletion.
                deletion_needs[target].push(position);
            }
        }
    }
    for (position, mut needs) in deletion_needs.into_iter().enumerate() {
        if !needs.is_empty() {
            needs.sort_unstable();
            steps[position].depends_on.extend(needs);
            steps[position].depends_on.sort_unstable();
            steps[position].depends_on.dedup();
        }
    }

    assign_waves(&mut steps);
    Plan {
        project: desired.project.clone(),
        environment: desired.environment.clone(),
        release: desired.release.clone(),
        steps,
    }
}

fn creation_changes(resource: &rigger_topology::Resource) -> Vec<Change> {
    resource
        .attributes
        .iter()
        .map(|(name, attribute)| Change {
            attribute: name.clone(),
            old: None,
            new: Some(attribute.value.clone()),
            forces_replacement: false,
        })
        .collect()
}

fn compare(desired: &rigger_topology::Resource, live: &ObservedResource) -> (Action, Vec<Change>) {
    let mut changes = Vec::new();
    for (name, attribute) in &desired.attributes {
        let old = live.attributes.get(name);
        if old != Some(&attribute.value) {
            changes.push(Change {
                attribute: name.clone(),
                old: old.cloned(),
                new: Some(attribute.value.clone()),
                forces_replacement: attribute.on_change == OnChange::Replace,
            });
        }
    }
    for (key, value) in &desired.tags {
        if key == tag::RELEASE {
            continue;
        }
        let old = live.tags.get(key);
        if old != Some(value) {
            changes.push(Change {
                attribute: format!("tags.{key}"),
                old: old.map(|v| Value::Text(v.clone())),
                new: Some(Value::Text(value.clone())),
                forces_replacement: false,
            });
        }
    }
    let action = if changes.is_empty() {
        Action::NoOp
    } else if changes.iter().any(|change| change.forces_replacement) {
        Action::Replace
    } else {
        Action::Update
    };
    (action, changes)
}

/// Longest-path layering: a step's wave is one more than the latest wave it waits for.
/// Dependencies always point to earlier steps for creations (topology order), but deletions can
/// point forward, so this walks the graph with an explicit stack rather than a single pass.
fn assign_waves(steps: &mut [Step]) {
    let mut wave: Vec<Option<usize>> = vec![None; steps.len()];
    let mut on_stack = vec![false; steps.len()];
    for start in 0..steps.len() {
        if steps[start].action == Action::NoOp || wave[start].is_some() {
            continue;
        }
        let mut stack = vec![(start, 0usize)];
        on_stack[start] = true;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&dependency) = steps[node].depends_on.get(*next) {
                *next += 1;
                if wave[dependency].is_none() && !on_stack[dependency] {
                    on_stack[dependency] = true;
                    stack.push((dependency, 0));
                }
                continue;
            }
            // A cycle cannot come from the topology (it lists dependencies first); if an
            // observed world has one anyway, the edge back is ignored rather than looping.
            let level = steps[node]
                .depends_on
                .iter()
                .filter_map(|&dependency| wave[dependency])
                .map(|w| w + 1)
                .max()
                .unwrap_or(0);
            wave[node] = Some(level);
            on_stack[node] = false;
            stack.pop();
        }
    }
    for (step, wave) in steps.iter_mut().zip(wave) {
        step.wave = wave;
    }
}

#[cfg(test)]
mod tests;
