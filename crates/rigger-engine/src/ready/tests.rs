//! Waiting for ready against a scripted provider on tokio's paused clock.

use std::collections::VecDeque;
use std::sync::Mutex;

use rigger_plan::status::ServerStatus;

use super::*;

fn server(id: &str, state: &str, lb: Option<&str>) -> ServerStatus {
    ServerStatus {
        id: id.into(),
        roles: vec!["web".into()],
        address: String::new(),
        release: "r1".into(),
        state: state.into(),
        processes: Vec::new(),
        load_balancer: lb.map(str::to_owned),
    }
}

fn status(phase: Phase, message: &str, servers: Vec<ServerStatus>) -> Status {
    Status {
        schema: rigger_plan::status::SCHEMA.into(),
        version: rigger_plan::status::SCHEMA_VERSION,
        project: "shop".into(),
        environment: "prod".into(),
        provider: "fake".into(),
        phase,
        message: message.into(),
        release: "r1".into(),
        urls: Vec::new(),
        supervisor_pid: None,
        supervisor_restarts: None,
        maintenance: false,
        groups: Vec::new(),
        servers,
        replication: Vec::new(),
        updated: 0,
    }
}

/// Answers the scripted statuses in turn (the last one for ever); `gone_after` polls, it is gone.
struct Script {
    statuses: VecDeque<Option<Status>>,
    polls: u32,
    gone_after: Option<u32>,
}

impl ReadySource for Script {
    type Error = String;

    async fn status(&mut self) -> Result<Option<Status>, String> {
        self.polls += 1;
        Ok(if self.statuses.len() > 1 {
            self.statuses.pop_front().unwrap()
        } else {
            self.statuses.front().cloned().flatten()
        })
    }

    async fn gone(&mut self) -> Option<String> {
        (self.gone_after.is_some_and(|n| self.polls >= n)).then(|| "the supervisor exited".into())
    }
}

const SETTINGS: ReadySettings = ReadySettings {
    poll: Duration::from_secs(2),
    timeout: Duration::from_secs(60),
};

fn script(statuses: Vec<Option<Status>>) -> Script {
    Script {
        statuses: statuses.into(),
        polls: 0,
        gone_after: None,
    }
}

#[tokio::test(start_paused = true)]
async fn each_change_is_said_once_until_every_server_is_in_service() {
    let pending = status(
        Phase::Starting,
        "1 of 2 servers not in service yet",
        vec![
            server("web[1]", "in_service", Some("InService")),
            server("web[2]", "pending", Some("OutOfService")),
        ],
    );
    let mut source = script(vec![
        None,
        Some(status(
            Phase::Starting,
            "starting cache and databases",
            Vec::new(),
        )),
        Some(pending.clone()),
        Some(pending),
        Some(status(Phase::Ready, "2 servers in service", Vec::new())),
    ]);
    let lines = Mutex::new(Vec::new());
    let progress = |line: &str| lines.lock().unwrap().push(line.to_owned());
    let ready = wait_until_ready(&mut source, &SETTINGS, &progress)
        .await
        .unwrap();
    assert_eq!(ready.message, "2 servers in service");
    assert_eq!(
        lines.into_inner().unwrap(),
        [
            "starting cache and databases",
            "waiting for web[2] (pending, load balancer OutOfService)",
            "every server is in service (8 s)",
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_boot_ends_the_wait_at_once_with_the_providers_words() {
    let mut source = script(vec![Some(status(
        Phase::Starting,
        "db-primary: boot failed: mounting the data volume (exit 1)",
        vec![server("db-primary", BOOT_FAILED, None)],
    ))]);
    let started = tokio::time::Instant::now();
    let error = wait_until_ready(&mut source, &SETTINGS, &crate::progress::Silent)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, NotReady::Failed(m) if m.contains("mounting the data volume")),
        "{error}"
    );
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_provider_that_gave_up_ends_the_wait() {
    let mut source = script(vec![Some(status(Phase::Starting, "starting", Vec::new()))]);
    source.gone_after = Some(3);
    let error = wait_until_ready(&mut source, &SETTINGS, &crate::progress::Silent)
        .await
        .unwrap_err();
    assert!(matches!(error, NotReady::Gone(_)), "{error}");
    assert_eq!(source.polls, 3);
}

#[tokio::test(start_paused = true)]
async fn the_wait_ends_exactly_at_the_timeout_saying_what_it_waited_for() {
    let mut source = script(vec![Some(status(
        Phase::Starting,
        "",
        vec![server("web[1]", "pending", Some("OutOfService"))],
    ))]);
    let started = tokio::time::Instant::now();
    let error = wait_until_ready(&mut source, &SETTINGS, &crate::progress::Silent)
        .await
        .unwrap_err();
    assert_eq!(started.elapsed(), SETTINGS.timeout);
    assert_eq!(
        error.to_string(),
        "not ready after 60 s: waiting for web[1] (pending, load balancer OutOfService)"
    );
}

#[test]
fn what_up_waits_for_names_each_server_not_in_service_else_the_providers_message() {
    let mut status = status(
        Phase::Starting,
        "2 of 3 servers are not in service yet",
        vec![
            server("web-1", "pending", Some("OutOfService")),
            server("web-2", "in_service", Some("InService")),
            server("cache", "pending", None),
        ],
    );
    assert_eq!(
        not_in_service(&status),
        "web-1 (pending, load balancer OutOfService), cache (pending)"
    );
    status.servers.clear();
    assert_eq!(
        not_in_service(&status),
        "2 of 3 servers are not in service yet"
    );
}
