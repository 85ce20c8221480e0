//! End to end: deploys on the local provider, under steady HTTPS load through the load
//! balancer. A changed app rolls out with zero failed requests and its pages show the new
//! revision; a release whose health check fails rolls back by itself, with zero failed
//! requests, and says why; a second deploy at the same time is refused and names the holder;
//! a Celery task running during the deploy completes; maintenance mode and rollback work.
//! Needs root and the packages of scripts/install-packages.sh, like local_stack.rs.

mod common;
mod hermetic;

use std::process::Stdio;
use std::time::Duration;

use common::{AppSource, Load, Site, curl, eventually, kill_hard, process_of, status_json};

const BLOCK: &str = "127.80";
const HTTPS_PORT: u16 = 19443;
const HTTP_PORT: u16 = 19080;

fn site(path: &str) -> String {
    format!("https://{BLOCK}.0.1:{HTTPS_PORT}{path}")
}

#[test]
#[ignore = "end to end: scripts/test runs it after the other tests (-- --ignored)"]
fn deploys_roll_out_and_back_without_dropping_a_request() {
    let project = Site::new("deploys", 80, HTTP_PORT, HTTPS_PORT, AppSource::GitCopy);
    assert!(project.rigger(&["up"]).status.success(), "rigger up failed");

    // A change to the app, deployed under load while a long Celery task runs.
    let revision = project.commit_change(
        "polls/views.py",
        "\n",
        "\n# Changed by the deploy test.\n",
        "a new revision",
    );
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"text":"survives the deploy"}"#,
        // Longer than the deploy takes to reach the worker: its warm shutdown must wait, with
        // its database connection still up, for the task to write its note.
        &site("/tasks/slow-note?seconds=25"),
    ]);
    assert_eq!(code, 202, "{body}");
    let task: serde_json::Value = serde_json::from_str(&body).unwrap();
    let task_id = task["task_id"].as_str().unwrap().to_owned();

    let load = Load::start(&site("/healthcheck.html"), 4);
    let mut deploy = project
        .command(&["deploy"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While it runs, a second deploy is refused and names the holder.
    eventually(
        "the deploy lock to be taken",
        Duration::from_secs(60),
        || {
            let status = project.rigger(&["lock", "status"]);
            String::from_utf8_lossy(&status.stdout)
                .contains("held by")
                .then_some(())
        },
    );
    let second = project.rigger(&["deploy"]);
    assert!(!second.status.success());
    let refusal = String::from_utf8_lossy(&second.stderr);
    assert!(
        refusal.contains("another deploy holds the lock"),
        "{refusal}"
    );
    assert!(refusal.contains("deploy HEAD"), "{refusal}");
    let finished = deploy.wait().unwrap();
    let mut deploy_out = String::new();
    std::io::Read::read_to_string(deploy.stdout.as_mut().unwrap(), &mut deploy_out).unwrap();
    let mut deploy_err = String::new();
    std::io::Read::read_to_string(deploy.stderr.as_mut().unwrap(), &mut deploy_err).unwrap();
    eprintln!("$ rigger deploy\n{deploy_out}{deploy_err}");
    assert!(finished.success(), "the deploy failed");
    let (served, failures, releases) = load.finish();
    let new_release = deploy_out.trim().to_owned();
    assert!(
        new_release.ends_with(&revision),
        "{new_release} is not of revision {revision}"
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the deploy: {failures:?}",
        failures.len(),
        served + failures.len()
    );
    assert!(served > 20, "too little load to mean anything: {served}");
    assert_eq!(releases.last(), Some(&new_release), "{releases:?}");
    eprintln!("deploy: {served} requests served, none failed; releases seen: {releases:?}");
    // The task that ran during the deploy completed.
    let (_, body) = curl(&[&site(&format!("/tasks/{task_id}?wait=20"))]);
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(state["successful"], true, "{state}");
    // On the worker that ran it when the deploy began, kept alive by its warm shutdown.
    assert_eq!(state["result"]["written_by"], "worker-1", "{state}");

    // A release whose health check fails: rolled back by itself, no request lost, and why.
    let broken = project.commit_change(
        "polls/health.py",
        "return _text(200, f\"OK {settings.RIGGER_SERVER} {settings.RIGGER_RELEASE}\")",
        "return _text(503, \"broken on purpose\")",
        "break the health check",
    );
    let load = Load::start(&site("/healthcheck.html"), 4);
    let failed = project.rigger(&["deploy", "--health-timeout", "15"]);
    let (served, failures, releases) = load.finish();
    assert!(!failed.status.success());
    let why = String::from_utf8_lossy(&failed.stderr);
    assert!(why.contains("rolled back"), "{why}");
    assert!(why.contains("answered 503"), "{why}");
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the rollback: {failures:?}",
        failures.len(),
        served + failures.len()
    );
    assert_eq!(releases.last(), Some(&new_release), "{releases:?}");
    let history = project.rigger(&["releases", "--json"]);
    let history: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
    let last = history.as_array().unwrap().last().unwrap();
    assert_eq!(last["result"], "rolled back");
    assert!(last["release"].as_str().unwrap().ends_with(&broken));

    // Maintenance mode: 503 with the page, while the health check stays green.
    assert!(project.rigger(&["maintenance", "on"]).status.success());
    let (code, body) = curl(&[&site("/")]);
    assert_eq!(code, 503);
    assert!(body.contains("maintenance"), "{body}");
    assert_eq!(curl(&[&site("/healthcheck.html")]).0, 200);
    assert!(project.rigger(&["maintenance", "off"]).status.success());
    assert_eq!(curl(&[&site("/")]).0, 200);

    // Rollback to the release before, without rebuilding, while a task runs longer than
    // `--worker-stop-timeout`: the old worker is killed after 2 s instead of being waited for,
    // and the task (the app acknowledges late) is redelivered to the new worker and completes.
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"text":"outlives its worker"}"#,
        &site("/tasks/slow-note?seconds=45"),
    ]);
    assert_eq!(code, 202, "{body}");
    let task: serde_json::Value = serde_json::from_str(&body).unwrap();
    let long_task = task["task_id"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_secs(1));
    let started = std::time::Instant::now();
    let back = project.rigger(&["rollback", "--worker-stop-timeout", "2"]);
    let took = started.elapsed();
    assert!(back.status.success());
    assert_eq!(String::from_utf8_lossy(&back.stdout).trim(), "initial");
    assert!(
        took < Duration::from_secs(40),
        "the rollback waited for the task ({took:?}) instead of stopping the worker after 2 s"
    );
    eventually(
        "the interrupted task to complete on the new worker",
        Duration::from_secs(120),
        || {
            let (_, body) = curl(&[&site(&format!("/tasks/{long_task}?wait=5"))]);
            let state: serde_json::Value = serde_json::from_str(&body).ok()?;
            (state["successful"] == true).then_some(())
        },
    );
    let (_, body) = curl(&[&site("/healthcheck.html")]);
    assert!(
        body.ends_with("initial") || body.trim_end().ends_with("initial"),
        "{body}"
    );

    // A deploy cut off by stopping the environment (the broken release again: its new web
    // server waits for a health check that never passes): the supervisor stops at once
    // instead of finishing the deploy first, the deploy is recorded as interrupted, and the
    // next `up` puts every server back on the release the environment runs.
    let deploy = project
        .command(&["deploy", "--health-timeout", "300"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually(
        "the deploy waiting for its new web server",
        Duration::from_secs(120),
        || {
            let output = project.command(&["status", "--json"]).output().ok()?;
            let status: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
            let message = status["message"].as_str().unwrap_or_default();
            (status["phase"] == "deploying" && message.contains("launching")).then_some(())
        },
    );
    // While the deploy waits, the supervisor keeps healing beside it: a killed Redis (a
    // stand-alone server) and a killed gunicorn on a web server the deploy has not replaced
    // yet are both restarted in place, and the deploy goes on.
    let status = status_json(&project);
    let killed = [
        process_of(&status, |s| s["id"] == "cache", "redis").expect("redis runs"),
        process_of(
            &status,
            |s| s["roles"][0] == "web" && s["release"] == "initial",
            "gunicorn",
        )
        .expect("an old web server's gunicorn runs"),
    ];
    for (server, process, pid) in &killed {
        eprintln!("killing {process} (pid {pid}) on {server} during the deploy");
        kill_hard(*pid);
    }
    eventually(
        "both killed processes restarted while the deploy runs",
        Duration::from_secs(60),
        || {
            let status = status_json(&project);
            let restarted = killed.iter().all(|(server, process, pid)| {
                process_of(&status, |s| s["id"] == server.as_str(), process)
                    .is_some_and(|(_, _, now)| now != *pid)
            });
            (restarted && status["phase"] == "deploying").then_some(())
        },
    );
    let lock = project.rigger(&["lock", "status"]);
    assert!(
        String::from_utf8_lossy(&lock.stdout).contains("held by"),
        "the deploy no longer holds its lock"
    );
    let stopping = std::time::Instant::now();
    assert!(project.rigger(&["down"]).status.success());
    assert!(
        stopping.elapsed() < Duration::from_secs(60),
        "down waited for the deploy: {:?}",
        stopping.elapsed()
    );
    let cut = deploy.wait_with_output().unwrap();
    assert!(!cut.status.success());
    assert!(
        String::from_utf8_lossy(&cut.stderr).contains("interrupted"),
        "{}",
        String::from_utf8_lossy(&cut.stderr)
    );
    let history = project.rigger(&["releases", "--json"]);
    let history: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
    assert_eq!(
        history.as_array().unwrap().last().unwrap()["result"],
        "interrupted"
    );
    assert!(project.rigger(&["up"]).status.success());
    let (_, body) = curl(&[&site("/healthcheck.html")]);
    assert!(body.trim_end().ends_with("initial"), "{body}");
    let releases = server_releases(&status_json(&project));
    assert!(releases.iter().all(|r| r == "initial"), "{releases:?}");

    // The same deploy cut off by killing the supervisor outright (SIGKILL: nothing of it
    // runs to record anything): the deploy fails, and the next supervisor (its keeper starts
    // one at once; `up` waits for it) records it as interrupted in the history and puts every
    // server back on the environment's release.
    let deploy = project
        .command(&["deploy", "--health-timeout", "300"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let supervisor = eventually(
        "the deploy waiting for its new web server",
        Duration::from_secs(120),
        || {
            let status = status_json(&project);
            let message = status["message"].as_str().unwrap_or_default();
            (status["phase"] == "deploying" && message.contains("launching"))
                .then(|| status["supervisor_pid"].as_i64())
                .flatten()
        },
    );
    kill_hard(supervisor);
    let cut = deploy.wait_with_output().unwrap();
    assert!(!cut.status.success());
    assert!(project.rigger(&["up"]).status.success());
    let history = project.rigger(&["releases", "--json"]);
    let history: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
    let last = history.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["result"], "interrupted", "{last}");
    assert!(
        last["reason"].as_str().unwrap_or_default().contains("died"),
        "{last}"
    );
    let releases = server_releases(&status_json(&project));
    assert!(releases.iter().all(|r| r == "initial"), "{releases:?}");
}

/// Each server's release, as the status shows it (the load balancer has none).
fn server_releases(status: &serde_json::Value) -> Vec<String> {
    status["servers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["release"].as_str())
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .collect()
}
