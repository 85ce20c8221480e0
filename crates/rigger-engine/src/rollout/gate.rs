//! The order and the health gate of a rolling replacement: the pure half of [`super::roll_out`].
//!
//! Pure: the caller passes the clock (`now`, a duration since the batch was launched) and what
//! the load balancer reports; nothing here sleeps or asks anything. The flow feeds
//! [`HealthGate::observe`] until it says healthy, timed out or failed.

use std::collections::BTreeMap;
use std::time::Duration;

/// How many servers a deploy replaces at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    Count(usize),
    /// A percentage of the group, rounded up, at least one.
    Percent(u8),
}

/// How long a batch's new servers may take to be healthy before the rollout rolls back
/// (`--health-timeout`); the default of both providers.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long an old web server may take to finish its requests (`--drain-timeout`).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an old worker's running tasks may take to finish (`--worker-stop-timeout`).
pub const DEFAULT_WORKER_STOP_TIMEOUT: Duration = Duration::from_secs(600);

impl Default for BatchSize {
    /// One at a time: the slowest, and the one that never lowers capacity by more than one.
    fn default() -> Self {
        BatchSize::Count(1)
    }
}

impl std::str::FromStr for BatchSize {
    type Err = String;

    /// `2` or `50%`.
    fn from_str(text: &str) -> Result<Self, String> {
        let invalid =
            || format!("`{text}` is not a batch size: give a count (`2`) or a percentage (`50%`)");
        if let Some(percent) = text.strip_suffix('%') {
            let value: u8 = percent.trim().parse().map_err(|_| invalid())?;
            if value == 0 || value > 100 {
                return Err(format!(
                    "`{text}`: a percentage must be between 1% and 100%"
                ));
            }
            return Ok(BatchSize::Percent(value));
        }
        match text.trim().parse::<usize>() {
            Ok(0) => Err(format!(
                "`{text}`: a batch must replace at least one server"
            )),
            Ok(count) => Ok(BatchSize::Count(count)),
            Err(_) => Err(invalid()),
        }
    }
}

/// The servers to replace, in batches (oldest first, as given).
pub fn batches<T: Clone>(old: &[T], size: BatchSize) -> Vec<Vec<T>> {
    if old.is_empty() {
        return Vec::new();
    }
    let per_batch = match size {
        BatchSize::Count(count) => count.max(1),
        BatchSize::Percent(percent) => (old.len() * usize::from(percent)).div_ceil(100).max(1),
    };
    old.chunks(per_batch).map(<[T]>::to_vec).collect()
}

/// What the gate decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateResult {
    /// Not all healthy yet; keep observing.
    Waiting,
    /// Every new server passed.
    Healthy,
    /// Time is up: these servers were not healthy, with the last state seen for each.
    TimedOut { unhealthy: BTreeMap<String, String> },
    /// A server failed outright (a process died, its boot failed): no point waiting.
    Failed { server: String, why: String },
}

/// Waits for new servers to be healthy behind the load balancer, up to a timeout.
///
/// A server counts as healthy only when seen healthy in `stable_checks` consecutive
/// observations, so one lucky check of a flapping server does not let a bad release through.
#[derive(Debug, Clone)]
pub struct HealthGate {
    servers: Vec<String>,
    timeout: Duration,
    stable_checks: u32,
    streak: BTreeMap<String, u32>,
    last_state: BTreeMap<String, String>,
}

impl HealthGate {
    pub fn new(servers: Vec<String>, timeout: Duration, stable_checks: u32) -> Self {
        HealthGate {
            servers,
            timeout,
            stable_checks: stable_checks.max(1),
            streak: BTreeMap::new(),
            last_state: BTreeMap::new(),
        }
    }

    /// One observation at `now` (time since the batch was launched): each server's state as
    /// the load balancer reports it (`UP`, `DOWN`, ...; absent means not registered), and the
    /// servers that failed outright, with why (a process died, its boot reported a failure).
    pub fn observe(
        &mut self,
        now: Duration,
        states: &BTreeMap<String, String>,
        failed: &BTreeMap<String, String>,
    ) -> GateResult {
        if let Some((server, why)) = self
            .servers
            .iter()
            .find_map(|s| failed.get(s).map(|why| (s, why)))
        {
            return GateResult::Failed {
                server: server.clone(),
                why: why.clone(),
            };
        }
        for server in &self.servers {
            let state = states
                .get(server)
                .cloned()
                .unwrap_or_else(|| "not registered".into());
            let streak = self.streak.entry(server.clone()).or_insert(0);
            *streak = if state == "UP" { *streak + 1 } else { 0 };
            self.last_state.insert(server.clone(), state);
        }
        if self
            .servers
            .iter()
            .all(|s| self.streak.get(s).copied().unwrap_or(0) >= self.stable_checks)
        {
            return GateResult::Healthy;
        }
        if now >= self.timeout {
            let unhealthy = self
                .servers
                .iter()
                .filter(|s| self.streak.get(*s).copied().unwrap_or(0) < self.stable_checks)
                .map(|s| {
                    (
                        s.clone(),
                        self.last_state.get(s).cloned().unwrap_or_default(),
                    )
                })
                .collect();
            return GateResult::TimedOut { unhealthy };
        }
        GateResult::Waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn batches_by_count_and_percentage() {
        let old = ["web-1", "web-2", "web-3", "web-4", "web-5"];
        assert_eq!(batches(&old, BatchSize::default()).len(), 5);
        assert_eq!(
            batches(&old, BatchSize::Count(2)),
            vec![
                vec!["web-1", "web-2"],
                vec!["web-3", "web-4"],
                vec!["web-5"]
            ]
        );
        assert_eq!(
            batches(&old, BatchSize::Percent(50))
                .iter()
                .map(Vec::len)
                .collect::<Vec<_>>(),
            [3, 2]
        );
        assert_eq!(batches(&old, BatchSize::Percent(1)).len(), 5);
        assert!(batches::<&str>(&[], BatchSize::Count(3)).is_empty());
        assert_eq!("25%".parse(), Ok(BatchSize::Percent(25)));
        assert_eq!("3".parse(), Ok(BatchSize::Count(3)));
        assert!("0".parse::<BatchSize>().is_err());
        assert!("150%".parse::<BatchSize>().is_err());
        assert!(
            "two"
                .parse::<BatchSize>()
                .unwrap_err()
                .contains("give a count")
        );
    }

    #[test]
    fn the_gate_opens_after_stable_checks() {
        let mut gate = HealthGate::new(vec!["web-3".into(), "web-4".into()], 60 * S, 2);
        assert_eq!(
            gate.observe(S, &states(&[("web-3", "DOWN")]), &BTreeMap::new()),
            GateResult::Waiting
        );
        assert_eq!(
            gate.observe(
                2 * S,
                &states(&[("web-3", "UP"), ("web-4", "UP")]),
                &BTreeMap::new()
            ),
            GateResult::Waiting
        );
        assert_eq!(
            gate.observe(
                3 * S,
                &states(&[("web-3", "UP"), ("web-4", "UP")]),
                &BTreeMap::new()
            ),
            GateResult::Healthy
        );
    }

    #[test]
    fn a_flapping_server_does_not_pass() {
        let mut gate = HealthGate::new(vec!["web-3".into()], 5 * S, 2);
        for second in 1..5 {
            let state = if second % 2 == 0 { "UP" } else { "DOWN 1/2" };
            assert_eq!(
                gate.observe(second * S, &states(&[("web-3", state)]), &BTreeMap::new()),
                GateResult::Waiting
            );
        }
        assert_eq!(
            gate.observe(5 * S, &states(&[("web-3", "DOWN")]), &BTreeMap::new()),
            GateResult::TimedOut {
                unhealthy: states(&[("web-3", "DOWN")])
            }
        );
    }

    #[test]
    fn the_timeout_names_only_the_unhealthy_servers() {
        let mut gate = HealthGate::new(vec!["web-3".into(), "web-4".into()], 10 * S, 1);
        let result = gate.observe(11 * S, &states(&[("web-3", "UP")]), &BTreeMap::new());
        assert_eq!(
            result,
            GateResult::TimedOut {
                unhealthy: states(&[("web-4", "not registered")])
            }
        );
    }

    #[test]
    fn a_dead_server_fails_at_once() {
        let mut gate = HealthGate::new(vec!["web-3".into()], 600 * S, 1);
        let result = gate.observe(
            S,
            &states(&[]),
            &states(&[("web-3", "a process of the server exited")]),
        );
        assert!(matches!(result, GateResult::Failed { server, .. } if server == "web-3"));
    }
}
