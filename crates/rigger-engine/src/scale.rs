//! `rigger scale web=3 worker=2`, the same on every provider: every count is checked against
//! rigger.toml's bounds before any is set (a bad one changes nothing), a deploy or database
//! operation holding the lock refuses it (it counts on the groups as they are), then each group's
//! desired count is set, then the flow waits (bounded) until each scaled group has exactly
//! that many servers, all in service (web servers also healthy behind the load balancer),
//! reporting what it waits for whenever that changes. An environment that is down only
//! records the counts: they apply at its next `up`.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use rigger_plan::deploys::LockHolder;
use rigger_plan::status::{Phase, Status};
use rigger_topology::Role;

use crate::progress::Progress;

/// How a provider sets a group's size and shows the environment.
pub trait ScaleTarget: Send {
    type Error: Send + fmt::Display;

    /// Who holds the deploy lock, when a live holder does (a stale lock is nobody's): a
    /// deploy or database operation counts on the groups staying as they are.
    fn lock_holder(
        &mut self,
    ) -> impl Future<Output = Result<Option<LockHolder>, Self::Error>> + Send;

    /// Sets group `group`'s desired count (the provider keeps it: `desired.json` and the
    /// supervisor locally, the Auto Scaling group on AWS).
    fn set_desired(
        &mut self,
        group: Role,
        count: u32,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The environment as it is now, in the shared status schema.
    fn status(&mut self) -> impl Future<Output = Result<Status, Self::Error>> + Send;
}

/// How often to look, and how long to wait for the groups.
#[derive(Debug, Clone, Copy)]
pub struct ScaleSettings {
    pub poll: Duration,
    pub timeout: Duration,
}

/// Why scaling did not end with the groups at their counts.
#[derive(Debug)]
pub enum ScaleError<E> {
    /// A count names no group or is outside its bounds; nothing was changed.
    Invalid(String),
    /// A deploy or database operation holds the lock; nothing was changed.
    Busy(LockHolder),
    /// The provider failed (an API call, a state file).
    Provider(E),
    /// The counts are set, but the groups did not get there in time.
    TimedOut { seconds: u64, waiting_for: String },
}

impl<E: fmt::Display> fmt::Display for ScaleError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScaleError::Invalid(why) => write!(f, "{why}"),
            ScaleError::Busy(holder) => write!(
                f,
                "the lock is held by {holder}: scale once it is done (its servers and counts \
                 are what it works with)"
            ),
            ScaleError::Provider(error) => write!(f, "{error}"),
            ScaleError::TimedOut {
                seconds,
                waiting_for,
            } => write!(
                f,
                "the counts are set, but after {seconds} s still waiting for {waiting_for}; \
                 `rigger status` shows each server's state"
            ),
        }
    }
}

/// Each `(group, count)` as a group role, all checked against `sizing`'s bounds first; a
/// group named twice is refused too (which one would win is a guess).
pub fn checked_counts(
    sizing: &rigger_config::Environment,
    counts: &[(String, u32)],
) -> Result<Vec<(Role, u32)>, String> {
    let mut checked: Vec<(Role, u32)> = Vec::new();
    for (group, count) in counts {
        sizing.check_scale(group, *count)?;
        let role = if group == "web" {
            Role::Web
        } else {
            Role::Worker
        };
        if checked.iter().any(|(seen, _)| *seen == role) {
            return Err(format!("`{group}` is given twice"));
        }
        checked.push((role, *count));
    }
    if checked.is_empty() {
        return Err("nothing to scale: give GROUP=COUNT (e.g. web=3)".to_owned());
    }
    Ok(checked)
}

/// Sets the counts, then waits for the groups to serve them.
pub async fn scale<T: ScaleTarget>(
    target: &mut T,
    sizing: &rigger_config::Environment,
    counts: &[(String, u32)],
    settings: &ScaleSettings,
    progress: &dyn Progress,
) -> Result<(), ScaleError<T::Error>> {
    let counts = checked_counts(sizing, counts).map_err(ScaleError::Invalid)?;
    if let Some(holder) = target.lock_holder().await.map_err(ScaleError::Provider)? {
        return Err(ScaleError::Busy(holder));
    }
    for (group, count) in &counts {
        target
            .set_desired(*group, *count)
            .await
            .map_err(ScaleError::Provider)?;
        progress.report(&format!("{} desired count set to {count}", group.as_str()));
    }
    let deadline = tokio::time::Instant::now() + settings.timeout;
    let mut said = String::new();
    loop {
        let status = target.status().await.map_err(ScaleError::Provider)?;
        if status.phase == Phase::Down {
            progress.report("the environment is down: the counts apply at its next `rigger up`");
            return Ok(());
        }
        let waiting_for = short_of(&status, &counts);
        if waiting_for.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ScaleError::TimedOut {
                seconds: settings.timeout.as_secs(),
                waiting_for,
            });
        }
        if waiting_for != said {
            progress.report(&format!("waiting for {waiting_for}"));
            said = waiting_for;
        }
        tokio::time::sleep(settings.poll).await;
    }
}

/// What keeps the groups from their counts, in words (`web: 2 of 3 in service`); empty when
/// nothing does.
fn short_of(status: &Status, counts: &[(Role, u32)]) -> String {
    let mut missing = Vec::new();
    for (group, count) in counts {
        let members: Vec<_> = status
            .servers
            .iter()
            .filter(|s| s.roles.iter().any(|r| r == group.as_str()))
            .collect();
        let serving = members
            .iter()
            .filter(|s| {
                s.state == "in_service"
                    && s.load_balancer
                        .as_deref()
                        .is_none_or(|lb| matches!(lb, "UP" | "InService" | "healthy"))
            })
            .count();
        let count = *count as usize;
        if members.len() != count || serving != count {
            missing.push(format!(
                "{}: {serving} of {count} in service{}",
                group.as_str(),
                if members.len() > count {
                    format!(", {} to remove", members.len() - count)
                } else {
                    String::new()
                }
            ));
        }
    }
    missing.join("; ")
}

#[cfg(test)]
mod tests;
