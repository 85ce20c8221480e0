//! End to end: the supervisor killed outright (SIGKILL) under steady HTTPS load through the
//! load balancer. Its keeper starts a new one at once, which adopts every service still
//! running instead of restarting it (the same pids): zero failed requests, and `rigger
//! status` says the supervisor was restarted and why. The adopted services are watched as
//! its own children are (a killed Redis is restarted), a configuration changed while no
//! supervisor ran is applied in place (nginx reloaded with a new HSTS header, nothing
//! restarted), and `rigger down` stops the
//! keeper, the supervisor and every service. Needs root, like local_stack.rs.

mod common;
mod hermetic;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{AppSource, Load, Site, alive, eventually, kill_hard, process_of, status_json};

const BLOCK: u8 = 86;
const HTTPS_PORT: u16 = 22443;
const HTTP_PORT: u16 = 22080;

/// Every running service of the environment, (server, process) -> pid.
fn service_pids(status: &serde_json::Value) -> BTreeMap<(String, String), i64> {
    let mut pids = BTreeMap::new();
    for server in status["servers"].as_array().unwrap() {
        for process in server["processes"].as_array().unwrap() {
            if process["state"] == "running" {
                pids.insert(
                    (
                        server["id"].as_str().unwrap().to_owned(),
                        process["name"].as_str().unwrap().to_owned(),
                    ),
                    process["pid"].as_i64().unwrap(),
                );
            }
        }
    }
    pids
}

/// The parent of `pid`, from /proc.
fn parent_of(pid: i64) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let (_, rest) = stat.rsplit_once(") ").unwrap();
    rest.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Waits until a supervisor other than `old` reports the environment ready.
fn ready_under_a_new_supervisor(project: &Site, old: i64) -> serde_json::Value {
    eventually(
        "a new supervisor to report the environment ready",
        Duration::from_secs(120),
        || {
            let status = status_json(project);
            let new = status["supervisor_pid"]
                .as_i64()
                .is_some_and(|pid| pid != old);
            (new && status["phase"] == "ready").then_some(status)
        },
    )
}

#[test]
#[ignore = "end to end: scripts/test runs it after the other tests (-- --ignored)"]
fn a_killed_supervisor_is_back_at_once_and_adopts_every_service() {
    let project = Site::new("crash", BLOCK, HTTP_PORT, HTTPS_PORT, AppSource::Link);
    let up = project.rigger(&["up"]);
    assert!(
        up.status.success(),
        "rigger up failed: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let before = status_json(&project);
    let supervisor = before["supervisor_pid"].as_i64().unwrap();
    let keeper = parent_of(supervisor);
    let pids = service_pids(&before);
    assert!(pids.len() >= 15, "{pids:?}");

    let load = Load::start(&project.url("/healthcheck.html"), 4);
    eventually("the load to be served", Duration::from_secs(30), || {
        (load.served() >= 20).then_some(())
    });
    let killed = Instant::now();
    kill_hard(supervisor);
    let after = ready_under_a_new_supervisor(&project, supervisor);
    let back = killed.elapsed();
    // Requests go on after the take-over too.
    let served_then = load.served();
    eventually("more requests served", Duration::from_secs(30), || {
        (load.served() >= served_then + 20).then_some(())
    });
    let (served, failures, _) = load.finish();
    eprintln!(
        "supervisor killed: a new one reported ready {:.2} s later; {served} requests, {} failed",
        back.as_secs_f64(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {served} requests failed while the supervisor was replaced: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let new_supervisor = after["supervisor_pid"].as_i64().unwrap();
    assert_eq!(
        parent_of(new_supervisor),
        keeper,
        "the keeper started the new supervisor"
    );
    assert_eq!(
        service_pids(&after),
        pids,
        "every service adopted, none restarted"
    );
    assert_eq!(after["supervisor_restarts"]["count"], 1, "{after}");
    let text = project.rigger(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("restarted 1 time by its keeper (last: killed by SIGKILL"),
        "{text}"
    );

    // Adopted services are watched: a killed Redis is restarted.
    let (_, _, redis) = process_of(&after, |s| s["id"] == "cache", "redis").expect("redis runs");
    kill_hard(redis);
    eventually("Redis restarted", Duration::from_secs(60), || {
        process_of(&status_json(&project), |s| s["id"] == "cache", "redis")
            .filter(|(_, _, pid)| *pid != redis)
    });

    // A configuration that changed before a supervisor starts is applied in place where a
    // reload applies it: HSTS changes the web servers' nginx configuration, so nginx is
    // adopted and reloaded (same pid, the new header served); nothing is restarted.
    let config = project.dir.join("rigger.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let changed = text.replace(
        "[environments.local]\n",
        "[environments.local]\nhsts_max_age = 300\n",
    );
    assert_ne!(changed, text);
    let (_, headers) = common::curl(&["-I", &project.url("/healthcheck.html")]);
    assert!(
        !headers.to_ascii_lowercase().contains("max-age=300"),
        "{headers}"
    );
    std::fs::write(&config, changed).unwrap();
    let before = status_json(&project);
    let supervisor = before["supervisor_pid"].as_i64().unwrap();
    let pids = service_pids(&before);
    kill_hard(supervisor);
    let after = ready_under_a_new_supervisor(&project, supervisor);
    assert_eq!(
        service_pids(&after),
        pids,
        "a change a reload applies restarted something"
    );
    let (code, headers) = common::curl(&["-I", &project.url("/healthcheck.html")]);
    assert_eq!(code, 200);
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("strict-transport-security: max-age=300"),
        "the reloaded nginx does not send the new HSTS header: {headers}"
    );

    // A supervisor killed during `db promote`: its successor records the operation
    // `interrupted` in the database history, saying what became of it.
    let supervisor = status_json(&project)["supervisor_pid"].as_i64().unwrap();
    let promote = project
        .command(&["db", "promote"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let begun = project.env_dir().join("db/begun.json");
    eventually(
        "the supervisor to begin the promotion",
        Duration::from_secs(30),
        || begun.exists().then_some(()),
    );
    kill_hard(supervisor);
    let cut = promote.wait_with_output().unwrap();
    assert!(
        !cut.status.success(),
        "{}",
        String::from_utf8_lossy(&cut.stderr)
    );
    ready_under_a_new_supervisor(&project, supervisor);
    let history = project.rigger(&["db", "history", "--json"]);
    let history: Vec<serde_json::Value> = serde_json::from_slice(&history.stdout).unwrap();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0]["operation"], "db promote", "{history:?}");
    assert_eq!(history[0]["result"], "interrupted", "{history:?}");
    assert!(
        history[0]["reason"]
            .as_str()
            .unwrap()
            .contains("the supervisor died during `db promote`"),
        "{history:?}"
    );

    assert!(project.rigger(&["down"]).status.success());
    assert!(!alive(keeper as i32), "the keeper stopped");
    assert!(!alive(new_supervisor as i32));
    for ((server, process), pid) in service_pids(&after) {
        assert!(
            !alive(pid as i32),
            "{server}/{process} (pid {pid}) still runs"
        );
    }
}
