//! The rollout flow against a recorded fleet, on tokio's paused clock: a two-minute health
//! timeout takes no real time, and the test reads how much clock time each step took.

use std::collections::{BTreeMap, BTreeSet};

use tokio::time::Instant;

use super::*;

/// A fleet that records every step and answers health from rules per release.
#[derive(Default)]
struct Fleet {
    /// Server id -> (role, release, observations so far).
    servers: BTreeMap<String, (Role, String, u32)>,
    next: u32,
    /// Releases whose new servers never pass the health check.
    unhealthy: BTreeSet<String>,
    /// Releases whose new servers fail outright (their process exits).
    crashing: BTreeSet<String>,
    /// Releases whose servers alternate between UP and DOWN.
    flapping: BTreeSet<String>,
    /// Releases the group starts fewer servers of than asked.
    short_launch: BTreeSet<String>,
    /// Workers of every release but this one crash.
    workers_crash_unless: Option<&'static str>,
    /// Checks a new server takes to be UP.
    checks_to_up: u32,
    /// A provider failure at the n-th step (counted over every call).
    fail_at_step: Option<usize>,
    steps: usize,
    log: Vec<String>,
    /// The fewest web servers serving at any retirement.
    lowest_web_capacity: Option<usize>,
}

impl Fleet {
    fn with(web: usize, worker: usize, release: &str) -> Fleet {
        let mut fleet = Fleet {
            checks_to_up: 3,
            ..Fleet::default()
        };
        for _ in 0..web {
            fleet.add(Role::Web, release);
        }
        for _ in 0..worker {
            fleet.add(Role::Worker, release);
        }
        // Existing servers are long past their checks.
        for server in fleet.servers.values_mut() {
            server.2 = u32::MAX / 2;
        }
        fleet.log.clear();
        fleet
    }

    fn add(&mut self, role: Role, release: &str) -> String {
        self.next += 1;
        let id = format!("{}-{}", role.as_str(), self.next);
        self.servers
            .insert(id.clone(), (role, release.to_owned(), 0));
        id
    }

    fn step(&mut self, what: String) -> Result<(), String> {
        self.steps += 1;
        if self.fail_at_step == Some(self.steps) {
            self.log.push(format!("FAILED {what}"));
            return Err(format!("the provider failed at: {what}"));
        }
        self.log.push(what);
        Ok(())
    }

    fn releases(&self, role: Role) -> Vec<String> {
        self.servers
            .values()
            .filter(|(r, _, _)| *r == role)
            .map(|(_, release, _)| release.clone())
            .collect()
    }

    /// Whether servers of `role` on `release` have a process that exits.
    fn crashes(&self, role: Role, release: &str) -> bool {
        self.crashing.contains(release)
            || (role == Role::Worker
                && self
                    .workers_crash_unless
                    .is_some_and(|healthy| healthy != release))
    }

    fn healthy(&self, id: &str) -> bool {
        self.servers.get(id).is_some_and(|(role, release, checks)| {
            !self.unhealthy.contains(release)
                && !self.crashes(*role, release)
                && *checks >= self.checks_to_up
        })
    }
}

impl RolloutTarget for Fleet {
    type Error = String;

    fn has_group(&self, _role: Role) -> bool {
        true
    }

    async fn outdated(&mut self, role: Role, release: &str) -> Result<Vec<String>, String> {
        self.step(format!("outdated {}", role.as_str()))?;
        Ok(self
            .servers
            .iter()
            .filter(|(_, (r, rel, _))| *r == role && rel != release)
            .map(|(id, _)| id.clone())
            .collect())
    }

    async fn begin(&mut self, role: Role, release: &str, surge: usize) -> Result<(), String> {
        self.step(format!("begin {} {release} surge {surge}", role.as_str()))
    }

    async fn launch(
        &mut self,
        role: Role,
        release: &str,
        replacing: &[String],
    ) -> Result<Launched, String> {
        self.step(format!(
            "launch {} {release} for {}",
            role.as_str(),
            replacing.join(",")
        ))?;
        let count = if self.short_launch.contains(release) {
            replacing.len() - 1
        } else {
            replacing.len()
        };
        Ok(Launched::Servers(
            (0..count).map(|_| self.add(role, release)).collect(),
        ))
    }

    async fn observe(&mut self, _role: Role, servers: &[String]) -> Result<Observation, String> {
        let mut observation = Observation::default();
        for id in servers {
            let Some((role, release, checks)) = self.servers.get_mut(id) else {
                continue;
            };
            *checks += 1;
            let (role, release, checks) = (*role, release.clone(), *checks);
            if self.crashes(role, &release) && checks >= 2 {
                observation
                    .failed
                    .insert(id.clone(), "a process of the server exited".into());
            }
            let state = if self.flapping.contains(&release) {
                if checks % 2 == 0 { "UP" } else { "DOWN (flap)" }
            } else if self.healthy(id) {
                "UP"
            } else {
                "DOWN (503)"
            };
            observation.states.insert(id.clone(), state.into());
        }
        Ok(observation)
    }

    async fn explain(&mut self, _role: Role, servers: &[String]) -> String {
        servers
            .iter()
            .map(|id| format!("  {id}: GET /healthcheck.html answered 503"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn discard(&mut self, role: Role, servers: &[String]) -> Result<(), String> {
        self.step(format!("discard {} {}", role.as_str(), servers.join(",")))?;
        for id in servers {
            self.servers.remove(id);
        }
        Ok(())
    }

    async fn retire(
        &mut self,
        role: Role,
        servers: &[String],
        _settings: &RolloutSettings,
    ) -> Result<(), String> {
        if role == Role::Web {
            // What serves while these leave: every web server that is up and not leaving.
            let serving = self
                .servers
                .iter()
                .filter(|(id, (r, _, _))| {
                    *r == Role::Web && !servers.contains(id) && self.healthy(id)
                })
                .count();
            self.lowest_web_capacity = Some(
                self.lowest_web_capacity
                    .map_or(serving, |lowest| lowest.min(serving)),
            );
        }
        self.step(format!("retire {} {}", role.as_str(), servers.join(",")))?;
        for id in servers {
            self.servers.remove(id);
        }
        Ok(())
    }

    async fn end(&mut self, role: Role) -> Result<(), String> {
        self.step(format!("end {}", role.as_str()))
    }

    fn report(&mut self, _message: &str) {}
}

fn settings() -> RolloutSettings {
    RolloutSettings {
        poll: Duration::from_secs(2),
        ..RolloutSettings::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_deploy_replaces_web_then_workers_one_batch_at_a_time_never_below_capacity() {
    let mut fleet = Fleet::with(2, 1, "r1");
    let outcome = roll_out(&mut fleet, "r2", "r1", &settings()).await;
    assert_eq!(outcome, Ok(RolloutOutcome::Completed));
    assert_eq!(
        fleet.log,
        [
            "outdated web",
            "begin web r2 surge 1",
            "launch web r2 for web-1",
            "retire web web-1",
            "launch web r2 for web-2",
            "retire web web-2",
            "end web",
            "outdated worker",
            "begin worker r2 surge 1",
            "launch worker r2 for worker-3",
            "retire worker worker-3",
            "end worker",
        ]
    );
    assert_eq!(fleet.releases(Role::Web), ["r2", "r2"]);
    assert_eq!(fleet.releases(Role::Worker), ["r2"]);
    // Two web servers served at every moment: each old one left only after its replacement
    // was healthy.
    assert_eq!(fleet.lowest_web_capacity, Some(2));
}

#[tokio::test(start_paused = true)]
async fn a_server_counts_healthy_only_after_a_stable_streak() {
    let mut fleet = Fleet::with(1, 0, "r1");
    fleet.checks_to_up = 5;
    let started = Instant::now();
    roll_out(&mut fleet, "r2", "r1", &settings()).await.unwrap();
    // Up from the 5th check, and a streak of 2: 6 checks, 5 polls of 2 s apart.
    assert_eq!(started.elapsed(), Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn a_batch_not_healthy_in_time_is_discarded_and_nothing_old_was_retired() {
    let mut fleet = Fleet::with(2, 1, "r1");
    fleet.unhealthy.insert("r2".into());
    let started = Instant::now();
    let outcome = roll_out(&mut fleet, "r2", "r1", &settings()).await.unwrap();
    let elapsed = started.elapsed();
    // The gate waited the whole health timeout, and not a poll longer.
    assert!(
        elapsed >= DEFAULT_HEALTH_TIMEOUT && elapsed < DEFAULT_HEALTH_TIMEOUT + settings().poll,
        "{elapsed:?}"
    );
    let RolloutOutcome::RolledBack { reason } = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(
        reason,
        "web: not healthy within 120 s: web-4: DOWN (503)\n  web-4: GET /healthcheck.html answered 503"
    );
    assert_eq!(
        fleet.log,
        [
            "outdated web",
            "begin web r2 surge 1",
            "launch web r2 for web-1",
            "discard web web-4",
            "end web",
            // Nothing had switched: the rollback has nothing to replace.
            "begin web r1 surge 0",
            "end web",
        ]
    );
    assert_eq!(fleet.releases(Role::Web), ["r1", "r1"]);
    assert_eq!(fleet.releases(Role::Worker), ["r1"]);
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_crashes_fails_at_once_and_the_web_group_goes_back() {
    // Web servers of r2 are fine; its worker's process exits.
    let mut fleet = Fleet {
        workers_crash_unless: Some("r1"),
        ..Fleet::with(2, 1, "r1")
    };
    let started = Instant::now();
    let outcome = roll_out(&mut fleet, "r2", "r1", &settings()).await.unwrap();
    // Failed at its second check, not after the timeout.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    let RolloutOutcome::RolledBack { reason } = outcome else {
        panic!("{outcome:?}");
    };
    assert!(
        reason.starts_with("worker: worker-6: a process of the server exited"),
        "{reason}"
    );
    // The worker batch went at once; the two web servers of r2 were replaced by r1 ones,
    // health-gated and one at a time.
    assert_eq!(
        &fleet.log[10..],
        [
            "discard worker worker-6",
            "end worker",
            "begin web r1 surge 1",
            "launch web r1 for web-4",
            "retire web web-4",
            "launch web r1 for web-5",
            "retire web web-5",
            "end web",
            "begin worker r1 surge 0",
            "end worker",
        ]
    );
    assert_eq!(fleet.releases(Role::Web), ["r1", "r1"]);
    assert_eq!(fleet.releases(Role::Worker), ["r1"]);
    assert_eq!(fleet.lowest_web_capacity, Some(2));
}

#[tokio::test(start_paused = true)]
async fn batches_by_percentage_surge_by_the_widest_batch() {
    let mut fleet = Fleet::with(4, 0, "r1");
    let mut settings = settings();
    settings.batch = BatchSize::Percent(50);
    roll_out(&mut fleet, "r2", "r1", &settings).await.unwrap();
    assert_eq!(
        fleet.log[..5],
        [
            "outdated web",
            "begin web r2 surge 2",
            "launch web r2 for web-1,web-2",
            "retire web web-1,web-2",
            "launch web r2 for web-3,web-4",
        ]
    );
    assert_eq!(fleet.releases(Role::Web), ["r2"; 4]);
}

#[tokio::test(start_paused = true)]
async fn a_group_that_starts_fewer_servers_than_asked_fails_the_batch() {
    let mut fleet = Fleet::with(2, 0, "r1");
    let mut settings = settings();
    settings.batch = BatchSize::Count(2);
    fleet.short_launch.insert("r2".into());
    let outcome = roll_out(&mut fleet, "r2", "r1", &settings).await.unwrap();
    let RolloutOutcome::RolledBack { reason } = outcome else {
        panic!("{outcome:?}");
    };
    assert!(
        reason.starts_with("web: only 1 of 2 new server(s) started within 120 s"),
        "{reason}"
    );
    assert!(
        fleet.log.contains(&"discard web web-3".to_owned()),
        "{:?}",
        fleet.log
    );
    // Old servers never left.
    assert!(!fleet.log.iter().any(|step| step.starts_with("retire")));
    assert_eq!(fleet.releases(Role::Web), ["r1", "r1"]);
}

#[tokio::test(start_paused = true)]
async fn a_flapping_server_never_passes() {
    let mut fleet = Fleet::with(1, 0, "r1");
    fleet.flapping.insert("r2".into());
    let outcome = roll_out(&mut fleet, "r2", "r1", &settings()).await.unwrap();
    assert!(
        matches!(&outcome, RolloutOutcome::RolledBack { reason } if reason.contains("web-2: DOWN (flap)")),
        "{outcome:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_rollback_that_fails_too_says_both_reasons() {
    let mut fleet = Fleet {
        workers_crash_unless: Some("r1"),
        ..Fleet::with(2, 1, "r1")
    };
    // The previous release's web servers are not healthy any more either (say, the database
    // they need is gone).
    fleet.unhealthy.insert("r1".into());
    let outcome = roll_out(&mut fleet, "r2", "r1", &settings()).await.unwrap();
    let RolloutOutcome::RollbackFailed { reason, rollback } = outcome else {
        panic!("{outcome:?}");
    };
    assert!(reason.starts_with("worker: "), "{reason}");
    assert!(
        rollback.starts_with("web: not healthy within 120 s: web-7: DOWN (503)"),
        "{rollback}"
    );
    // The servers of r2 that passed still serve: a failed rollback does not empty the group.
    assert_eq!(fleet.releases(Role::Web), ["r2", "r2"]);
}

#[tokio::test(start_paused = true)]
async fn a_provider_failure_stops_the_rollout_where_it_is() {
    let mut fleet = Fleet::with(2, 0, "r1");
    // The 4th step: retiring web-1.
    fleet.fail_at_step = Some(4);
    let outcome = roll_out(&mut fleet, "r2", "r1", &settings()).await;
    assert_eq!(
        outcome,
        Err("the provider failed at: retire web web-1".to_owned())
    );
    assert_eq!(fleet.log.last().unwrap(), "FAILED retire web web-1");
    assert_eq!(fleet.log.len(), 4, "{:?}", fleet.log);
}

#[tokio::test(start_paused = true)]
async fn a_deploy_of_what_runs_changes_nothing() {
    let mut fleet = Fleet::with(2, 1, "r1");
    let outcome = roll_out(&mut fleet, "r1", "r1", &settings()).await;
    assert_eq!(outcome, Ok(RolloutOutcome::Completed));
    assert!(
        fleet
            .log
            .iter()
            .all(|step| !step.starts_with("launch") && !step.starts_with("retire")),
        "{:?}",
        fleet.log
    );
}

#[tokio::test(start_paused = true)]
async fn finishing_an_interrupted_rollout_replaces_only_what_is_not_on_the_release() {
    let mut fleet = Fleet::with(2, 1, "r1");
    // Cut off after one web server of r2 was launched and passed.
    let stray = fleet.add(Role::Web, "r2");
    fleet.servers.get_mut(&stray).unwrap().2 = 10;
    fleet.log.clear();
    assert_eq!(finish_on(&mut fleet, "r1", &settings()).await, Ok(Ok(())));
    assert_eq!(
        fleet.log[..4],
        [
            "outdated web",
            "begin web r1 surge 1",
            "launch web r1 for web-4",
            "retire web web-4",
        ]
    );
    assert_eq!(fleet.releases(Role::Web), ["r1"; 3]);
    // And when the release itself does not come up, it says why and stops there.
    let mut fleet = Fleet::with(1, 0, "r2");
    fleet.unhealthy.insert("r1".into());
    let finished = finish_on(&mut fleet, "r1", &settings()).await.unwrap();
    assert!(
        finished
            .unwrap_err()
            .starts_with("web: not healthy within 120 s")
    );
    assert_eq!(fleet.releases(Role::Web), ["r2"]);
}
