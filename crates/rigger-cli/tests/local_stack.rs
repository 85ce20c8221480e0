//! End to end on the real services: the example site brought up by the real `rigger` binary
//! on the local provider, exercised through HTTPS, PostgreSQL and the supervisor, then taken
//! down. Needs root and the packages of scripts/install-packages.sh (scripts/test installs
//! them). One test function, because every step builds on the previous one and a whole stack
//! per step would cost minutes.

mod common;
mod hermetic;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{AppSource, Site, alive, curl, eventually};

const BLOCK: &str = "127.78";
const HTTPS_PORT: u16 = 18443;
const HTTP_PORT: u16 = 18080;

fn site(path: &str) -> String {
    format!("https://{BLOCK}.0.1:{HTTPS_PORT}{path}")
}

fn status(stack: &Site) -> serde_json::Value {
    let output = stack.rigger(&["status", "--json"]);
    assert!(output.status.success());
    serde_json::from_slice(&output.stdout).unwrap()
}

fn web_servers(stack: &Site) -> Vec<(String, String)> {
    status(stack)["servers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["roles"].as_array().unwrap().iter().any(|r| r == "web"))
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_owned(),
                s["load_balancer"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// Every pid the supervisor recorded, and the supervisor's.
fn recorded_pids(stack: &Site) -> Vec<i32> {
    let status = status(stack);
    let mut pids: Vec<i32> = status["servers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|server| server["processes"].as_array().unwrap().iter())
        .map(|process| process["pid"].as_i64().unwrap() as i32)
        .collect();
    pids.push(status["supervisor_pid"].as_i64().unwrap() as i32);
    pids
}

fn psql(conninfo: &str, password: &str) -> Output {
    Command::new("psql")
        .args([conninfo, "-XAtc", "select 1"])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .expect("psql runs")
}

#[test]
#[ignore = "end to end: scripts/test runs it after the other tests (-- --ignored)"]
fn the_example_site_runs_on_the_local_provider_with_real_services() {
    let stack = Site::new("e2e", 78, HTTP_PORT, HTTPS_PORT, AppSource::Link);

    // Up: returns when every web server is UP behind the load balancer, prints the URL.
    let up = stack.rigger(&["up"]);
    assert!(up.status.success(), "rigger up failed");
    assert_eq!(String::from_utf8_lossy(&up.stdout).trim(), site("/"));

    // HTTPS through the load balancer answers 200 from each web server.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let (code, body) = curl(&[&site("/healthcheck.html")]);
        assert_eq!(code, 200, "{body}");
        seen.insert(body.split_whitespace().nth(1).unwrap().to_owned());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["web-1", "web-2"]);
    // Port 80's stand-in redirects to https.
    let (code, _) = curl(&[
        "-o",
        "/dev/null",
        &format!("http://{BLOCK}.0.1:{HTTP_PORT}/"),
    ]);
    assert_eq!(code, 301);

    // A session written through one web server is read through the other.
    let jar = stack.dir.join("cookies");
    let jar = jar.to_str().unwrap();
    let mut visits = Vec::new();
    for _ in 0..4 {
        let (code, body) = curl(&["-c", jar, "-b", jar, &site("/session")]);
        assert_eq!(code, 200, "{body}");
        let session: serde_json::Value = serde_json::from_str(&body).unwrap();
        visits.push((
            session["server"].as_str().unwrap().to_owned(),
            session["visits"].as_i64().unwrap(),
        ));
    }
    assert_eq!(
        visits.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        [1, 2, 3, 4],
        "{visits:?}"
    );
    assert!(
        visits.windows(2).any(|w| w[0].0 != w[1].0),
        "one server answered every request: {visits:?}"
    );

    // A Celery task writes a row on the primary that then appears on the replica.
    let text = format!("e2e-{}", std::process::id());
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        &format!(r#"{{"text":"{text}"}}"#),
        &site("/tasks/write-row"),
    ]);
    assert_eq!(code, 202, "{body}");
    let task: serde_json::Value = serde_json::from_str(&body).unwrap();
    let task_id = task["task_id"].as_str().unwrap().to_owned();
    let note = eventually("the task's result", Duration::from_secs(30), || {
        let (_, body) = curl(&[&site(&format!("/tasks/{task_id}?wait=5"))]);
        let state: serde_json::Value = serde_json::from_str(&body).ok()?;
        (state["successful"] == true).then(|| state["result"].clone())
    });
    assert_eq!(note["text"], text.as_str());
    assert!(
        note["written_by"].as_str().unwrap().starts_with("worker-"),
        "{note}"
    );
    let id = note["id"].as_i64().unwrap();
    let replica_read = eventually("the row on the replica", Duration::from_secs(10), || {
        let (_, body) = curl(&[&site(&format!("/notes/{id}?from=replica"))]);
        let read: serde_json::Value = serde_json::from_str(&body).ok()?;
        (read["found"] == true).then_some(read)
    });
    assert_eq!(replica_read["database"], "replica1");
    assert_eq!(replica_read["text"], text.as_str());

    // The other tasks: survey events counted, a CSV export written under the media
    // directory, and Celery beat's periodic heartbeat.
    let (code, body) = curl(&["-X", "POST", &site("/events/start")]);
    assert_eq!(code, 202, "{body}");
    let event: serde_json::Value = serde_json::from_str(&body).unwrap();
    let event_id = event["task_id"].as_str().unwrap().to_owned();
    let counted = eventually("the event counted", Duration::from_secs(30), || {
        let (_, body) = curl(&[&site(&format!("/tasks/{event_id}?wait=5"))]);
        let state: serde_json::Value = serde_json::from_str(&body).ok()?;
        (state["successful"] == true).then(|| state["result"].clone())
    });
    assert_eq!(counted["kind"], "start", "{counted}");
    let (code, body) = curl(&["-X", "POST", &site("/exports")]);
    assert_eq!(code, 202, "{body}");
    let export: serde_json::Value = serde_json::from_str(&body).unwrap();
    let export_id = export["task_id"].as_str().unwrap().to_owned();
    let path = eventually("the CSV export", Duration::from_secs(30), || {
        let (_, body) = curl(&[&site(&format!("/tasks/{export_id}?wait=5"))]);
        let state: serde_json::Value = serde_json::from_str(&body).ok()?;
        (state["successful"] == true).then(|| state["result"].as_str().unwrap().to_owned())
    });
    assert!(
        path.starts_with(
            stack
                .env_dir()
                .join("shared/media/exports")
                .to_str()
                .unwrap()
        ),
        "{path}"
    );
    assert!(
        std::fs::read_to_string(&path).unwrap().contains("start"),
        "{path}"
    );
    eventually(
        "a heartbeat from Celery beat",
        Duration::from_secs(30),
        || {
            let (_, body) = curl(&[&site("/stats")]);
            let stats: serde_json::Value = serde_json::from_str(&body).ok()?;
            (!stats["latest_heartbeat"]["primary"].is_null()).then_some(())
        },
    );

    // PostgreSQL refuses a connection without TLS, and one from an unknown user.
    let password = std::fs::read_to_string(stack.env_dir().join("secrets/db_password")).unwrap();
    let primary = format!("host={BLOCK}.4.1 port=5432 dbname=e2e");
    let ok = psql(
        &format!("{primary} user=e2e sslmode=require"),
        password.trim(),
    );
    assert!(
        ok.status.success(),
        "the app user over TLS: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let plain = psql(
        &format!("{primary} user=e2e sslmode=disable"),
        password.trim(),
    );
    assert!(!plain.status.success());
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("no encryption"),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    let stranger = psql(&format!("{primary} user=intruder sslmode=require"), "guess");
    assert!(!stranger.status.success());

    // PgBouncer's admin console is rigger's: its admin user may read the pools, the app's
    // user may not (the app cannot pause its own pooler).
    let web = status(&stack)["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["roles"].as_array().unwrap().iter().any(|r| r == "web"))
        .cloned()
        .unwrap();
    let console = |user: &str, password: &str| {
        Command::new("psql")
            .arg(format!(
                "host={} port=6432 dbname=pgbouncer user={user} sslmode=disable",
                web["address"].as_str().unwrap()
            ))
            .args(["-XAtc", "SHOW POOLS"])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .expect("psql runs")
    };
    let admin_password =
        std::fs::read_to_string(stack.env_dir().join("secrets/pgbouncer_admin_password")).unwrap();
    let admin = console("rigger_pgbouncer_admin", admin_password.trim());
    assert!(
        admin.status.success(),
        "rigger's admin user: {}",
        String::from_utf8_lossy(&admin.stderr)
    );
    let app = console("e2e", password.trim());
    assert!(!app.status.success());
    assert!(
        String::from_utf8_lossy(&app.stderr).contains("not allowed"),
        "{}",
        String::from_utf8_lossy(&app.stderr)
    );
    let said = String::from_utf8_lossy(&stranger.stderr);
    assert!(said.contains("intruder"), "{said}");

    // Redis and RabbitMQ (which the sessions and tasks above went through) speak only TLS,
    // behind certificates of the environment's CA for the cache server's address.
    let cache = status(&stack)["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["roles"].as_array().unwrap().iter().any(|r| r == "cache"))
        .map(|s| s["address"].as_str().unwrap().to_owned())
        .unwrap();
    let ca = stack.env_dir().join("pki/ca.crt");
    let redis_password =
        std::fs::read_to_string(stack.env_dir().join("secrets/redis_password")).unwrap();
    let ping = Command::new("redis-cli")
        .args(["-h", &cache, "-p", "6380", "--tls", "--cacert"])
        .arg(&ca)
        .arg("ping")
        .env("REDISCLI_AUTH", redis_password.trim())
        .output()
        .expect("redis-cli runs");
    assert_eq!(
        String::from_utf8_lossy(&ping.stdout).trim(),
        "PONG",
        "{}",
        String::from_utf8_lossy(&ping.stderr)
    );
    let amqps = Command::new("openssl")
        .args(["s_client", "-connect", &format!("{cache}:5671"), "-CAfile"])
        .arg(&ca)
        .args(["-verify_return_error", "-verify_ip", &cache])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl runs");
    assert!(
        amqps.status.success(),
        "AMQPS: {}",
        String::from_utf8_lossy(&amqps.stderr)
    );
    for plain in [6379, 5672] {
        assert!(
            std::net::TcpStream::connect((cache.as_str(), plain)).is_err(),
            "something listens in clear on {cache}:{plain}"
        );
    }

    // Replication is visible in status.
    let status = status(&stack);
    assert_eq!(status["replication"][0]["id"], "db-replica1", "{status}");
    assert_eq!(status["replication"][0]["state"], "streaming", "{status}");

    // Secrets: names only, never values, nowhere rigger writes.
    let names = stack.rigger(&["secrets", "list"]);
    assert_eq!(String::from_utf8_lossy(&names.stdout).lines().count(), 6);
    let plan = stack.rigger(&["plan"]);
    let plan_json = stack.rigger(&["plan", "--json"]);
    for secret in std::fs::read_dir(stack.env_dir().join("secrets")).unwrap() {
        let secret = secret.unwrap().path();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&secret).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{}", secret.display());
        let value = std::fs::read_to_string(&secret).unwrap();
        for (what, text) in [
            ("names", &names.stdout),
            ("plan", &plan.stdout),
            ("plan --json", &plan_json.stdout),
            (
                "status.json",
                &std::fs::read(stack.env_dir().join("status.json")).unwrap(),
            ),
            (
                "supervisor.log",
                &std::fs::read(stack.env_dir().join("supervisor.log")).unwrap(),
            ),
        ] {
            assert!(
                !String::from_utf8_lossy(text).contains(value.trim()),
                "a secret appears in {what}"
            );
        }
    }

    // Re-running up changes nothing and says so; the plan agrees.
    let again = stack.rigger(&["up"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing to do"));
    assert!(String::from_utf8_lossy(&plan.stdout).contains("No changes"));

    // Killing one web server's gunicorn gets it out of the load balancer and replaced by a
    // new server (new id, new address) within 30 s, with nobody typing a command.
    let web1_gunicorn =
        std::fs::read_to_string(stack.env_dir().join("servers/web-1/pids/gunicorn.pid")).unwrap();
    let web1_gunicorn: serde_json::Value = serde_json::from_str(&web1_gunicorn).unwrap();
    let killed_at = Instant::now();
    Command::new("kill")
        .args(["-9", &web1_gunicorn["pid"].to_string()])
        .status()
        .unwrap();
    let servers = eventually("web-1's replacement UP", Duration::from_secs(30), || {
        let servers = web_servers(&stack);
        let ids: Vec<&str> = servers.iter().map(|(id, _)| id.as_str()).collect();
        (ids == ["web-2", "web-3"] && servers.iter().all(|(_, lb)| lb == "UP")).then_some(servers)
    });
    eprintln!("replaced in {:?}: {servers:?}", killed_at.elapsed());
    let (code, _) = curl(&[&site("/healthcheck.html")]);
    assert_eq!(code, 200);

    // Scaling the web group adds a server behind the load balancer.
    assert!(stack.rigger(&["scale", "web=3"]).status.success());
    eventually("3 web servers UP", Duration::from_secs(60), || {
        let servers = web_servers(&stack);
        (servers.len() == 3 && servers.iter().all(|(_, lb)| lb == "UP")).then_some(())
    });
    let out_of_bounds = stack.rigger(&["scale", "web=9"]);
    assert_eq!(out_of_bounds.status.code(), Some(2));

    // Down stops everything rigger started.
    let pids = recorded_pids(&stack);
    assert!(pids.len() > 20, "{pids:?}");
    assert!(stack.rigger(&["down"]).status.success());
    let left: Vec<i32> = pids.into_iter().filter(|pid| alive(*pid)).collect();
    assert!(left.is_empty(), "still running after down: {left:?}");
    let status = stack.rigger(&["status"]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("is down"));

    // Purging refuses without a confirmation, then deletes data and secrets with --yes.
    let refused = stack.rigger(&["down", "--purge"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(stack.env_dir().join("secrets").exists());
    assert!(stack.rigger(&["down", "--purge", "--yes"]).status.success());
    assert!(!stack.env_dir().exists());
}
