//! The group sizes `rigger scale` set (`desired.json`), which `plan`, `up` and the supervisor
//! use instead of rigger.toml's `desired`.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Desired group sizes set by `rigger scale`, overriding rigger.toml's `desired`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredCounts {
    pub web: Option<u32>,
    pub worker: Option<u32>,
}

impl DesiredCounts {
    /// The counts at `path` (`desired.json`); none set when there is no file. A damaged file
    /// is an error naming it, never "no counts": that would silently resize the groups.
    pub fn load(path: &Path) -> std::io::Result<DesiredCounts> {
        crate::registry::read_state(
            path,
            "the group sizes `rigger scale` set; remove it to go back to rigger.toml's \
             `desired` counts, then `rigger scale` again if needed",
        )
        .map(Option::unwrap_or_default)
    }

    /// The web and worker groups' desired counts: those `rigger scale` set, brought within
    /// rigger.toml's `min..=max` (which may have changed since), else rigger.toml's.
    pub fn resolve(&self, env: &rigger_config::Environment) -> (u32, u32) {
        let pick = |scaled: Option<u32>, group: &rigger_config::GroupSizing| {
            scaled.map_or(group.desired, |count| count.clamp(group.min, group.max))
        };
        (pick(self.web, &env.web), pick(self.worker, &env.worker))
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        crate::registry::write_atomically(
            path,
            &serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )
    }
}
