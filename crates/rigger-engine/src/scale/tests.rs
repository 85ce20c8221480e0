//! The scale flow against a recorded fake provider whose servers come into service a few
//! polls after their group's count changes, on tokio's paused clock.

use std::sync::Mutex;

use rigger_plan::status::{GroupStatus, ServerStatus};

use super::*;

/// rigger.toml's local environment: web 2..=4, worker 1..=1.
fn sizing() -> rigger_config::Environment {
    let config = rigger_config::parse(&rigger_config::starter("shop"), "rigger.toml")
        .expect("the starter file is valid");
    config.environments["local"].clone()
}

/// A provider whose groups launch a missing server at each poll (pending at first, in
/// service at the next) and remove a surplus one at once; `stuck` groups never get there.
struct Fleet {
    desired: Vec<(Role, u32)>,
    servers: Vec<(Role, u32, &'static str)>,
    next_id: u32,
    calls: Vec<String>,
    down: bool,
    stuck: bool,
    locked: Option<LockHolder>,
}

impl Fleet {
    fn new(web: u32, worker: u32) -> Fleet {
        let mut fleet = Fleet {
            desired: vec![(Role::Web, web), (Role::Worker, worker)],
            servers: Vec::new(),
            next_id: 1,
            calls: Vec::new(),
            down: false,
            stuck: false,
            locked: None,
        };
        for (role, count) in fleet.desired.clone() {
            for _ in 0..count {
                fleet.servers.push((role, fleet.next_id, "in_service"));
                fleet.next_id += 1;
            }
        }
        fleet
    }

    fn step(&mut self) {
        for server in &mut self.servers {
            if server.2 == "pending" {
                server.2 = "in_service";
            }
        }
        if self.stuck {
            return;
        }
        for (role, count) in self.desired.clone() {
            let have = self.servers.iter().filter(|s| s.0 == role).count() as u32;
            if have < count {
                self.servers.push((role, self.next_id, "pending"));
                self.next_id += 1;
            } else if have > count {
                let last = self.servers.iter().rposition(|s| s.0 == role).unwrap();
                self.servers.remove(last);
            }
        }
    }
}

impl ScaleTarget for Fleet {
    type Error = String;

    async fn lock_holder(&mut self) -> Result<Option<LockHolder>, String> {
        Ok(self.locked.clone())
    }

    async fn set_desired(&mut self, group: Role, count: u32) -> Result<(), String> {
        self.calls.push(format!("set {group} {count}"));
        for desired in &mut self.desired {
            if desired.0 == group {
                desired.1 = count;
            }
        }
        Ok(())
    }

    async fn status(&mut self) -> Result<Status, String> {
        self.calls.push("status".into());
        let servers = self
            .servers
            .iter()
            .map(|(role, id, state)| ServerStatus {
                id: format!("{role}-{id}"),
                roles: vec![role.as_str().to_owned()],
                address: String::new(),
                release: "r1".into(),
                state: (*state).into(),
                processes: Vec::new(),
                load_balancer: (*role == Role::Web)
                    .then(|| if *state == "in_service" { "UP" } else { "DOWN" }.to_owned()),
            })
            .collect();
        let status = Status {
            schema: rigger_plan::status::SCHEMA.into(),
            version: rigger_plan::status::SCHEMA_VERSION,
            project: "shop".into(),
            environment: "local".into(),
            provider: "fake".into(),
            phase: if self.down { Phase::Down } else { Phase::Ready },
            message: String::new(),
            release: "r1".into(),
            urls: Vec::new(),
            supervisor_pid: None,
            supervisor_restarts: None,
            maintenance: false,
            groups: self
                .desired
                .iter()
                .map(|(role, desired)| GroupStatus {
                    name: role.as_str().into(),
                    min: 0,
                    desired: *desired,
                    max: 9,
                })
                .collect(),
            servers,
            replication: Vec::new(),
            updated: 0,
        };
        self.step();
        Ok(status)
    }
}

const SETTINGS: ScaleSettings = ScaleSettings {
    poll: Duration::from_secs(1),
    timeout: Duration::from_secs(60),
};

fn counts(pairs: &[(&str, u32)]) -> Vec<(String, u32)> {
    pairs.iter().map(|(g, c)| ((*g).to_owned(), *c)).collect()
}

#[tokio::test(start_paused = true)]
async fn waits_until_every_new_server_is_in_service_and_says_what_it_waits_for() {
    let mut fleet = Fleet::new(2, 1);
    let lines = Mutex::new(Vec::new());
    let progress = |line: &str| lines.lock().unwrap().push(line.to_owned());
    let started = tokio::time::Instant::now();
    scale(
        &mut fleet,
        &sizing(),
        &counts(&[("web", 4)]),
        &SETTINGS,
        &progress,
    )
    .await
    .unwrap();
    assert_eq!(fleet.calls[0], "set web 4");
    assert_eq!(
        fleet
            .servers
            .iter()
            .filter(|s| s.0 == Role::Web && s.2 == "in_service")
            .count(),
        4
    );
    let lines = lines.into_inner().unwrap();
    assert_eq!(lines[0], "web desired count set to 4");
    assert_eq!(lines[1], "waiting for web: 2 of 4 in service");
    assert!(
        lines.contains(&"waiting for web: 3 of 4 in service".to_owned()),
        "{lines:?}"
    );
    // One server a poll, each in service a poll later.
    assert_eq!(started.elapsed(), Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn scaling_in_waits_for_the_surplus_to_go() {
    let mut fleet = Fleet::new(4, 1);
    let lines = Mutex::new(Vec::new());
    let progress = |line: &str| lines.lock().unwrap().push(line.to_owned());
    scale(
        &mut fleet,
        &sizing(),
        &counts(&[("web", 2)]),
        &SETTINGS,
        &progress,
    )
    .await
    .unwrap();
    assert_eq!(fleet.servers.iter().filter(|s| s.0 == Role::Web).count(), 2);
    assert!(
        lines
            .into_inner()
            .unwrap()
            .contains(&"waiting for web: 4 of 2 in service, 2 to remove".to_owned())
    );
}

#[tokio::test(start_paused = true)]
async fn a_count_out_of_bounds_changes_nothing_even_after_a_good_one() {
    let mut fleet = Fleet::new(2, 1);
    let refused = scale(
        &mut fleet,
        &sizing(),
        &counts(&[("web", 3), ("worker", 5)]),
        &SETTINGS,
        &super::super::progress::Silent,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&refused, ScaleError::Invalid(why) if why.contains("worker=5 is outside the group's bounds 1..=1")),
        "{refused}"
    );
    assert!(fleet.calls.is_empty(), "{:?}", fleet.calls);
    for bad in [
        counts(&[("db", 1)]),
        counts(&[("web", 3), ("web", 4)]),
        counts(&[]),
    ] {
        let refused = scale(
            &mut fleet,
            &sizing(),
            &bad,
            &SETTINGS,
            &super::super::progress::Silent,
        )
        .await
        .unwrap_err();
        assert!(matches!(refused, ScaleError::Invalid(_)), "{refused}");
    }
    assert!(fleet.calls.is_empty(), "{:?}", fleet.calls);
}

#[tokio::test(start_paused = true)]
async fn groups_that_never_get_there_time_out_exactly_at_the_limit_naming_what_is_missing() {
    let mut fleet = Fleet::new(2, 1);
    fleet.stuck = true;
    let started = tokio::time::Instant::now();
    let error = scale(
        &mut fleet,
        &sizing(),
        &counts(&[("web", 3)]),
        &SETTINGS,
        &super::super::progress::Silent,
    )
    .await
    .unwrap_err();
    assert_eq!(started.elapsed(), SETTINGS.timeout);
    assert_eq!(
        error.to_string(),
        "the counts are set, but after 60 s still waiting for web: 2 of 3 in service; \
         `rigger status` shows each server's state"
    );
}

#[tokio::test(start_paused = true)]
async fn an_environment_that_is_down_only_records_the_counts() {
    let mut fleet = Fleet::new(0, 0);
    fleet.down = true;
    fleet.stuck = true;
    let started = tokio::time::Instant::now();
    scale(
        &mut fleet,
        &sizing(),
        &counts(&[("web", 3)]),
        &SETTINGS,
        &super::super::progress::Silent,
    )
    .await
    .unwrap();
    assert_eq!(fleet.calls, ["set web 3", "status"]);
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_deploy_holding_the_lock_refuses_it_and_nothing_changes() {
    let mut fleet = Fleet::new(2, 1);
    fleet.locked = Some(LockHolder::new(
        [7; 8],
        "ops@host",
        42,
        "deploy HEAD",
        1_000,
    ));
    let refused = scale(
        &mut fleet,
        &sizing(),
        &counts(&[("web", 3)]),
        &SETTINGS,
        &super::super::progress::Silent,
    )
    .await
    .unwrap_err();
    assert!(matches!(refused, ScaleError::Busy(_)), "{refused}");
    assert!(refused.to_string().contains("deploy HEAD"), "{refused}");
    assert!(fleet.calls.is_empty(), "{:?}", fleet.calls);
}
