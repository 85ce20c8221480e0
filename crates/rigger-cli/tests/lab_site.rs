//! The whole AWS path, for real: the example site's AWS environment brought up by `rigger up`
//! against the lab (issue 12), whose instances are machines that run rigger's real user-data,
//! behind a load balancer that is HAProxy checking their health. Through the real `rigger`
//! binary, as an operator would: `up` reaches ready on the first try with the primary and the
//! replica launched together; the site answers HTTPS through the load balancer from both web
//! servers; a first deploy migrates and serves the new release, with no request failing
//! although its first new web machine is killed while it boots (issue 14); `exec`, `logs`,
//! `manage` reach the machines through the lab's bastion; `scale web=3` puts a third server
//! behind the load balancer; the primary's machine killed, `db promote --force` brings the
//! site back and says what may be lost; rebooting every machine brings the site
//! back, its database on its volume; `down` removes everything; then the same environment
//! behind an application load balancer comes up, serves from both web servers, and goes.
//!
//! Needs root, the lab image and moto (scripts/test provides them); fails, never skips.

mod hermetic;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod lab_support;
use lab_support::*;

/// The environment's name in the test's rigger.toml.
const ENV: &str = "lab";
/// Booting a stock machine, installing the release's wheels and migrating take a while; the
/// bound is for a loaded 2-core machine.
const BOOT: Duration = Duration::from_secs(600);

/// The example site, copied into a git repository of the test's own with a rigger.toml whose
/// `lab` environment is an AWS one pointed at the lab.
struct Site {
    dir: tempfile::TempDir,
    endpoint: String,
    /// The lab's state directory: the machines' states and boot logs are printed when a
    /// command fails.
    lab_state: PathBuf,
}

impl Site {
    fn rigger(&self, args: &[&str]) -> Command {
        let mut command = crate::hermetic::rigger_binary();
        command
            // Global options first: words after `--` belong to the remote command.
            .args(["-e", ENV, "--endpoint-url", &self.endpoint])
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .env("RIGGER_STATE_DIR", self.dir.path().join("state"))
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_MAX_ATTEMPTS", "1")
            .env_remove("AWS_PROFILE")
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1");
        command
    }

    /// Each machine's state as the lab saw it, and the end of its boot log (its user-data's
    /// output) and console.
    fn boot_logs(&self) -> String {
        let status = crate::hermetic::rigger_binary()
            .arg("lab")
            .arg("--dir")
            .arg(&self.lab_state)
            .args(["status", "--json"])
            .output()
            .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
            .unwrap_or_default();
        let machines = serde_json::from_str::<serde_json::Value>(&status)
            .map(|status| status["machines"].to_string())
            .unwrap_or(status);
        let mut out = format!("the lab's machines: {machines}\n");
        let Ok(entries) = std::fs::read_dir(self.lab_state.join("machines")) else {
            return out;
        };
        for entry in entries.flatten() {
            let machine = entry.path();
            for log in ["upper/var/log/cloud-init-output.log", "console.log"] {
                let text = std::fs::read_to_string(machine.join(log)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(25)..].join("\n");
                out.push_str(&format!(
                    "--- {} {log}\n{tail}\n",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
        out
    }

    fn run(&self, args: &[&str]) -> Output {
        self.rigger(args).output().expect("running rigger")
    }

    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "rigger {args:?}: {}\nthe machines' boot logs:\n{}",
            text(&output),
            self.boot_logs()
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    fn status(&self) -> serde_json::Value {
        let output = self.run(&["status", "--json"]);
        assert!(output.status.success(), "rigger status: {}", text(&output));
        serde_json::from_slice(&output.stdout).expect("status JSON")
    }

    fn app(&self) -> PathBuf {
        self.dir.path().join("app")
    }
}

fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args(["-c", "user.name=Test", "-c", "user.email=test@example.com"])
        .args(args)
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?}");
}

/// The example site's app and an AWS environment for the lab: two web servers, a worker, the
/// cache and queue server, a primary and a replica; the key pair imported from a key made
/// here, servers reached through the lab's bastion, whose host key is recorded.
fn site(lab: &TestLab, started: &Started) -> Site {
    let dir = tempfile::Builder::new()
        .prefix("rigger-lab-site-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/site/app");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&example)
        .arg(dir.path().join("app"))
        .status()
        .unwrap();
    assert!(copied.success());
    git(&dir.path().join("app"), &["init", "-q"]);
    git(&dir.path().join("app"), &["add", "."]);
    git(
        &dir.path().join("app"),
        &["commit", "-qm", "the example site"],
    );

    // The key pair's key; `ssh_identity` names the private key, beside rigger.toml.
    let (_, public) = make_key(dir.path());
    let public: Vec<&str> = public.split_whitespace().take(2).collect();

    let status = lab.status();
    let bastion = &status["bastion"];
    let known_hosts = dir.path().join("state/surveys").join(ENV).join("ssh");
    std::fs::create_dir_all(&known_hosts).unwrap();
    std::fs::write(
        known_hosts.join("known_hosts"),
        format!("{}\n", bastion["known_hosts_line"].as_str().unwrap()),
    )
    .unwrap();

    // The load balancer's certificate, uploaded with its key as an operator would.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let certificate = upload_self_signed_certificate(
        &runtime,
        &connect(&runtime, &started.endpoint),
        dir.path(),
        "surveys-lab",
        "surveys.example.com",
    );
    let template = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/site/lab.toml.template"),
    )
    .unwrap();
    let public_key = public.join(" ");
    let mut config = template;
    for (placeholder, value) in [
        ("@ENV@", ENV),
        ("@AMI@", started.ami.as_str()),
        ("@LOAD_BALANCER@", "classic"),
        ("@CERTIFICATE@", certificate.as_str()),
        ("@PUBLIC_KEY@", public_key.as_str()),
        ("@BASTION@", bastion["target"].as_str().unwrap()),
    ] {
        config = config.replace(placeholder, value);
    }
    assert_eq!(REGION, "us-east-1", "the template's region is the lab's");
    std::fs::write(dir.path().join("rigger.toml"), config).unwrap();
    Site {
        dir,
        endpoint: started.endpoint.clone(),
        lab_state: lab.state.path().to_path_buf(),
    }
}

/// `GET path` through the load balancer at `url` (the status's `https://ADDRESS/`), as the
/// site's domain; the status code and body. Never verifies the certificate: it is the test's
/// own self-signed one.
fn get(url: &str, path: &str) -> (u16, String) {
    let address = url
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_owned();
    let output = Command::new("curl")
        .args(["-sk", "--max-time", "10", "-w", "\n%{http_code}"])
        .args([
            "--resolve",
            &format!("surveys.example.com:443:{address}"),
            &format!("https://surveys.example.com{path}"),
        ])
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = body.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Waits until `rigger status` says ready with `web` web servers in service.
fn wait_ready(site: &Site, web: usize, what: &str) -> serde_json::Value {
    wait_for(what, BOOT, || {
        let status = site.status();
        let in_service = status["servers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| {
                s["roles"].as_array().unwrap().iter().any(|r| r == "web")
                    && s["state"] == "in_service"
            })
            .count();
        (status["phase"] == "ready" && in_service == web).then_some(status)
    })
}

/// The instances that answered `count` requests for the home page through the load
/// balancer (the example site names its instance in the page's title).
fn answering(url: &str, count: usize) -> std::collections::BTreeSet<String> {
    (0..count)
        .map(|_| {
            let (code, body) = get(url, "/");
            assert_eq!(code, 200, "{body}");
            body.split("<title>Surveys on ")
                .nth(1)
                .and_then(|rest| rest.split('<').next())
                .unwrap_or("?")
                .to_owned()
        })
        .collect()
}

#[test]
#[ignore = "end to end: scripts/test runs it after the other tests (-- --ignored)"]
fn the_example_site_runs_on_the_lab_from_up_to_down() {
    let (lab, started) = start_lab();
    let site = site(&lab, &started);
    let timeline = Instant::now();

    // Up: every server boots rigger's real user-data, the primary and the replica together.
    let up = site.ok(&["up"]);
    assert!(up.contains("every server is in service"), "{up}");
    let up_seconds = timeline.elapsed().as_secs_f64();
    let status = site.status();
    assert_eq!(status["phase"], "ready", "{status:#}");
    let url = status["urls"][0].as_str().unwrap().to_owned();
    assert!(
        url.starts_with("https://127.31."),
        "a URL that works from here: {url}"
    );

    // The site through the load balancer, from both web servers.
    let answered = answering(&url, 20);
    assert_eq!(answered.len(), 2, "both web servers answer: {answered:?}");
    assert!(
        answered.iter().all(|id| id.starts_with("i-")),
        "{answered:?}"
    );

    // The replica streams from the primary.
    let db = site.ok(&["db", "status"]);
    assert!(db.contains("streaming"), "{db}");

    // A first deploy migrates and serves the new release: it brings a migration.
    std::fs::write(
        site.app().join("polls/migrations/0002_lab_marker.py"),
        "from django.db import migrations\n\n\n\
         class Migration(migrations.Migration):\n    \
         dependencies = [(\"polls\", \"0001_initial\")]\n    \
         operations = [migrations.RunSQL(\"CREATE TABLE lab_marker (id integer)\", \"DROP TABLE lab_marker\")]\n",
    )
    .unwrap();
    git(&site.app(), &["add", "."]);
    git(
        &site.app(),
        &["commit", "-qm", "a second release, with a migration"],
    );
    // Under steady load through the load balancer, the first new web machine of the deploy
    // dies while it boots (a host failure): its group replaces it, the deploy completes or
    // rolls back by itself, and no request fails (it never was in service).
    let machines_before: Vec<String> = running_machines(&lab)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let load = Load::start(&url, &site.lab_state);
    let deploy = site
        .rigger(&["deploy", "--drain-timeout", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting rigger deploy");
    let (victim, victim_pid) = wait_for("the deploy's first new machine", BOOT, || {
        running_machines(&lab)
            .into_iter()
            .find(|(id, _)| !machines_before.contains(id))
    });
    kill_machine(victim_pid);
    let deployed = deploy.wait_with_output().expect("rigger deploy");
    let said = text(&deployed);
    assert!(
        deployed.status.success() || said.contains("rolled back"),
        "the deploy neither completed nor rolled back: {said}\nthe machines' boot logs:\n{}",
        site.boot_logs()
    );
    let status = if deployed.status.success() {
        assert!(!said.contains("migrations skipped"), "{said}");
        wait_ready(&site, 2, "ready after the deploy")
    } else {
        // Rolled back: the same release again, with nothing killed.
        wait_ready(&site, 2, "ready after the rollback");
        let deployed = site.ok(&["deploy", "--drain-timeout", "5"]);
        assert!(!deployed.contains("migrations skipped"), "{deployed}");
        wait_ready(&site, 2, "ready after the deploy")
    };
    let failed = load.stop();
    assert!(
        failed.is_empty(),
        "requests failed while a new machine died mid-deploy: {failed:?}"
    );
    assert!(
        !status.to_string().contains(&victim),
        "the killed machine {victim} is gone: {status:#}"
    );
    eprintln!(
        "a new web machine killed mid-deploy: the deploy {}: {said}",
        if deployed.status.success() {
            "completed"
        } else {
            "rolled back, and the next one completed"
        }
    );
    let releases: Vec<&str> = status["servers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["roles"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r == "web" || r == "worker")
        })
        .filter_map(|s| s["release"].as_str())
        .collect();
    assert_eq!(releases.len(), 3, "{status:#}");
    assert!(
        releases.iter().all(|r| *r != "initial"),
        "the app servers run the new release: {status:#}"
    );
    assert_eq!(answering(&url, 10).len(), 2);

    // Maintenance mode on every web server (recorded in SSM, switched over SSH): the site
    // answers 503 with the page while the health check stays green, then serves again.
    site.ok(&["maintenance", "on"]);
    for _ in 0..4 {
        let (code, body) = get(&url, "/");
        assert_eq!(code, 503, "{body}");
        assert!(body.to_lowercase().contains("maintenance"), "{body}");
        assert_eq!(get(&url, "/healthcheck.html").0, 200);
    }
    site.ok(&["maintenance", "off"]);
    for _ in 0..4 {
        assert_eq!(get(&url, "/").0, 200);
    }

    // A release whose health check fails: its new web server never passes the load
    // balancer's check, so the deploy rolls back by itself and says why (the server's own
    // answer, asked over SSH), and both web servers still serve the release before it.
    let health = site.app().join("polls/health.py");
    let healthy = std::fs::read_to_string(&health).unwrap();
    let passing = "return _text(200, f\"OK {settings.RIGGER_SERVER} {settings.RIGGER_RELEASE}\")";
    assert!(healthy.contains(passing), "{healthy}");
    std::fs::write(
        &health,
        healthy.replacen(passing, "return _text(503, \"broken on purpose\")", 1),
    )
    .unwrap();
    git(&site.app(), &["commit", "-qam", "break the health check"]);
    let broken = site.run(&["deploy", "--health-timeout", "150", "--drain-timeout", "5"]);
    let why = text(&broken);
    assert!(!broken.status.success(), "{why}");
    assert!(why.contains("rolled back"), "{why}");
    assert!(why.contains("broken on purpose"), "{why}");
    wait_ready(&site, 2, "ready after the rollback");
    assert_eq!(answering(&url, 10).len(), 2);
    std::fs::write(&health, healthy).unwrap();
    git(&site.app(), &["commit", "-qam", "mend the health check"]);

    // exec, manage, logs reach the machines through the bastion.
    let hostnames = site.ok(&["exec", "--", "hostname"]);
    assert_eq!(
        hostnames
            .lines()
            .filter(|l| l.contains("ip-172-31-"))
            .count(),
        6,
        "{hostnames}"
    );
    // A new server counts only once its boot script reported it finished: by the end of the
    // deploy every boot script has (as cloud-init records it), not only every group's view.
    let booted = site.run(&[
        "exec",
        "--",
        "sudo test -e /var/lib/cloud/instance/boot-finished",
    ]);
    assert!(booted.status.success(), "{}", text(&booted));
    // The primary's database is on its data volume, not on the root disk.
    let mounted = site.ok(&[
        "exec",
        "db-primary",
        "--",
        "findmnt -n -o SOURCE /var/lib/rigger",
    ]);
    assert!(mounted.contains("/dev/xvdf"), "{mounted}");
    let migrations = site.ok(&["manage", "--", "showmigrations", "polls"]);
    assert!(migrations.contains("[X] 0002_lab_marker"), "{migrations}");
    let logs = site.ok(&["logs", "web", "--lines", "5"]);
    assert!(!logs.is_empty());

    // A planned failover on the machines: PgBouncer paused on every app server, the replica
    // caught up and promoted, the old primary fenced, stunnel repointed, resumed. A row
    // written through the app's database connection (the worker's PgBouncer and stunnel)
    // before it is read through it after.
    let sql = |statement: &str| {
        format!(
            "from django.db import connection\nwith connection.cursor() as c:\n    c.execute({statement:?})\n    print('rows', c.fetchone()[0] if c.description else '')"
        )
    };
    // How many rows of the marker table have each id, read through the app's connection.
    let assert_markers = |expected: &[(i32, i32)]| {
        for (id, rows) in expected {
            let read = site.ok(&[
                "manage",
                "--",
                "shell",
                "-c",
                &sql(&format!("SELECT count(*) FROM lab_marker WHERE id = {id}")),
            ]);
            assert!(read.contains(&format!("rows {rows}")), "row {id}: {read}");
        }
    };
    site.ok(&[
        "manage",
        "--",
        "shell",
        "-c",
        &sql("INSERT INTO lab_marker VALUES (42)"),
    ]);
    let promoted = site.ok(&["db", "promote"]);
    assert!(promoted.contains("is the primary"), "{promoted}");
    assert!(promoted.contains("writes held for"), "{promoted}");
    let read = site.ok(&[
        "manage",
        "--",
        "shell",
        "-c",
        &sql("SELECT count(*) FROM lab_marker WHERE id = 42"),
    ]);
    assert!(read.contains("rows 1"), "{read}");
    // And written through the new primary: it accepts writes.
    site.ok(&[
        "manage",
        "--",
        "shell",
        "-c",
        &sql("INSERT INTO lab_marker VALUES (43)"),
    ]);
    assert_eq!(answering(&url, 10).len(), 2);
    // A backup (the providers' one pg_dump job, on the primary, uploaded to the bucket), a
    // row written after it, the backup restored (pg_restore in one transaction, in
    // maintenance): the rows of the backup are there, the one written after is not.
    let backup = site.run(&["db", "backup"]);
    assert!(backup.status.success(), "{}", text(&backup));
    let backup = String::from_utf8_lossy(&backup.stdout).trim().to_owned();
    assert!(
        site.ok(&["db", "backups"])
            .lines()
            .any(|name| name == backup),
        "{backup} is not listed"
    );
    site.ok(&[
        "manage",
        "--",
        "shell",
        "-c",
        &sql("INSERT INTO lab_marker VALUES (44)"),
    ]);
    site.ok(&["db", "restore", &backup, "--yes"]);
    assert_markers(&[(42, 1), (43, 1), (44, 0)]);
    // `db reseed` of the replica the failover used up: `up` builds it again next to the new
    // primary, and the reseed returns once it streams from it.
    site.ok(&["db", "reseed", "db-replica1"]);
    let db = site.ok(&["db", "status"]);
    assert!(db.contains("streaming"), "{db}");

    // Scale: a third web server behind the load balancer.
    site.ok(&["scale", "web=3"]);
    let status = wait_ready(&site, 3, "three web servers in service");

    assert_eq!(answering(&url, 10).len(), 3);

    // The primary's machine dies (a host failure): `db promote --force` promotes the replica
    // without it, says how much may be lost, and the site writes again; `db reseed` builds a
    // replica next to the new primary.
    let primary = status["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "db-primary")
        .unwrap_or_else(|| panic!("no db-primary in {status:#}"))["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let machine = machine_at(&lab, &primary).expect("the primary's machine");
    let killed = Instant::now();
    kill_machine(machine["pid"].as_i64().expect("a running machine's pid"));
    let forced = site.ok(&["db", "promote", "--force"]);
    assert!(forced.contains("is the primary"), "{forced}");
    assert!(
        forced.contains("the replica had received WAL up to") && forced.contains("may be lost"),
        "a forced failover says how much may be lost: {forced}"
    );
    site.ok(&[
        "manage",
        "--",
        "shell",
        "-c",
        &sql("INSERT INTO lab_marker VALUES (45)"),
    ]);
    assert_eq!(answering(&url, 10).len(), 3);
    let forced_seconds = killed.elapsed().as_secs_f64();
    assert_markers(&[(42, 1), (43, 1), (45, 1)]);
    site.ok(&["db", "reseed", "db-replica1"]);
    let db = site.ok(&["db", "status"]);
    assert!(db.contains("streaming"), "{db}");

    // Every machine rebooted from inside: the site comes back by itself, the databases on
    // their volumes (mounted again from fstab).
    let before: Vec<(String, i64)> = running_machines(&lab);
    let _ = site.run(&[
        "exec",
        "--",
        "sudo systemd-run --on-active=1 systemctl reboot",
    ]);
    let rebooted = Instant::now();
    wait_for("every machine booted again", BOOT, || {
        let now = running_machines(&lab);
        before
            .iter()
            .all(|(id, pid)| now.iter().any(|(i, p)| i == id && p != pid))
            .then_some(())
    });
    // Back means steadily: right after every machine rebooted, a web server the load
    // balancer already counts healthy was seen answering 502 once (its nginx up, its app not
    // answering for a moment).
    wait_for("the site back after rebooting every machine", BOOT, || {
        (site.status()["phase"] == "ready" && (0..10).all(|_| get(&url, "/").0 == 200))
            .then_some(())
    });
    let back_seconds = rebooted.elapsed().as_secs_f64();
    // Every web server back in rotation: the load balancer takes each one back after its
    // healthy threshold of checks, so the last may follow the others by a few seconds.
    wait_for("the three web servers answering again", BOOT, || {
        (answering(&url, 10).len() == 3).then_some(())
    });
    // Every machine reachable over SSH again (a machine serves before its sshd answers).
    wait_for("every machine's sshd answering again", BOOT, || {
        site.run(&["exec", "--", "true"])
            .status
            .success()
            .then_some(())
    });
    let db = site.ok(&["db", "status"]);
    assert!(db.contains("streaming"), "{db}");
    let migrations = site.ok(&["manage", "--", "showmigrations", "polls"]);
    assert!(
        migrations.contains("[X] 0002_lab_marker"),
        "the database survived the reboot: {migrations}"
    );

    // Down removes everything.
    site.ok(&["down", "--yes"]);
    let status = site.status();
    assert_eq!(status["phase"], "down", "{status:#}");
    let machines = wait_for("every machine gone", Duration::from_secs(120), || {
        let machines = lab.status()["machines"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        machines.is_empty().then_some(machines)
    });
    assert!(machines.is_empty());

    // The same environment behind an application load balancer (target groups, their
    // health as HAProxy sees it): up, both web servers answer, down.
    let toml = site.dir.path().join("rigger.toml");
    let text_now = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(
        &toml,
        text_now.replace(
            "load_balancer = \"classic\"",
            "load_balancer = \"application\"",
        ),
    )
    .unwrap();
    let application = Instant::now();
    site.ok(&["up"]);
    let application_seconds = application.elapsed().as_secs_f64();
    let url = site.status()["urls"][0].as_str().unwrap().to_owned();
    assert_eq!(
        answering(&url, 20).len(),
        2,
        "both web servers answer behind the application load balancer"
    );
    site.ok(&["down", "--yes"]);
    wait_for("every machine gone", Duration::from_secs(120), || {
        lab.status()["machines"]
            .as_array()
            .is_none_or(|m| m.is_empty())
            .then_some(())
    });
    let down = lab.rigger(&["down"]);
    assert!(down.status.success(), "{}", text(&down));
    assert_nothing_left(&lab, &started);
    eprintln!(
        "measured: up to ready {up_seconds:.0} s; primary's machine killed to the site writing \
         through the promoted replica {forced_seconds:.0} s; reboot of every machine to the site back {back_seconds:.0} s; \
         up behind an application load balancer {application_seconds:.0} s; whole test {:.0} s",
        timeline.elapsed().as_secs_f64()
    );
}

/// Steady requests for the home page through the load balancer, one after another, until
/// stopped: what a visitor sees while something happens.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Requests sent, those that failed, and those the lab's HAProxy itself failed.
    prober: std::thread::JoinHandle<(usize, Vec<String>, Vec<String>)>,
}

/// Whether a failed request is the lab's HAProxy failing to open a socket to any server in
/// the first moments of a new worker (its log says "Cannot get a server socket"; HAProxy 2.6
/// reaching servers in the lab's namespace, after a reload): the emulation's, which no AWS
/// load balancer does, not rigger's. docs/lab.md says so.
fn is_the_labs_reload_glitch(body: &str, log_tail: &str) -> bool {
    body.contains("No server is available to handle this request")
        && log_tail.contains("Cannot get a server socket")
}

impl Load {
    /// Starts the requests; `lab_state` is the lab's state directory, whose HAProxy is asked
    /// what it saw when a request fails.
    fn start(url: &str, lab_state: &Path) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, url) = (stop.clone(), url.to_owned());
        let (socket, log) = (
            lab_state.join("haproxy/stats.sock"),
            lab_state.join("haproxy.log"),
        );
        let prober = std::thread::spawn(move || {
            let (mut sent, mut failed, mut glitches) = (0, Vec::new(), Vec::new());
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                let (code, body) = get(&url, "/");
                sent += 1;
                if code != 200 {
                    let log_tail = last_lines(&log, 12);
                    let report = format!(
                        "{code}: {}\nHAProxy then: {}\nits log's last lines: {log_tail}",
                        body.chars().take(200).collect::<String>(),
                        haproxy_view(&socket),
                    );
                    if is_the_labs_reload_glitch(&body, &log_tail) {
                        glitches.push(report);
                    } else {
                        failed.push(report);
                    }
                }
            }
            (sent, failed, glitches)
        });
        Load { stop, prober }
    }

    /// Stops; the failed requests, each with its code and the start of its answer.
    fn stop(self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (sent, failed, glitches) = self.prober.join().expect("the load's thread");
        assert!(sent > 10, "the load sent only {sent} requests");
        // Rare (1 in about 6,000 requests when seen); more would be a problem of its own.
        assert!(
            glitches.len() <= 3,
            "the lab's HAProxy could not open server sockets for {} requests: {glitches:?}",
            glitches.len()
        );
        if !glitches.is_empty() {
            eprintln!(
                "load: {} request(s) failed by the lab's HAProxy itself after a reload (not counted): {glitches:?}",
                glitches.len()
            );
        }
        eprintln!("load: {sent} requests, {} failed", failed.len());
        failed
    }
}

/// What the lab's HAProxy says of its servers now (`show servers state`, and the worker's
/// pid): evidence for a failed request.
fn haproxy_view(socket: &Path) -> String {
    let ask = |command: &str| {
        use std::io::{Read as _, Write as _};
        let mut answer = String::new();
        if let Ok(mut stream) = std::os::unix::net::UnixStream::connect(socket) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = stream.write_all(format!("{command}\n").as_bytes());
            let _ = stream.read_to_string(&mut answer);
        }
        answer
    };
    let pid = ask("show info")
        .lines()
        .find(|l| l.starts_with("Pid: "))
        .unwrap_or("Pid: ?")
        .to_owned();
    format!("{pid}\n{}", ask("show servers state"))
}

/// The last `count` lines of the file at `path`.
fn last_lines(path: &Path, count: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

/// The lab's machine at `address`, as `rigger lab status --json` shows it.
fn machine_at(lab: &TestLab, address: &str) -> Option<serde_json::Value> {
    lab.status()["machines"]
        .as_array()?
        .iter()
        .find(|m| m["address"] == address)
        .cloned()
}

/// Each running machine's instance id and `systemd-nspawn` pid (a new pid: a new boot).
fn running_machines(lab: &TestLab) -> Vec<(String, i64)> {
    lab.status()["machines"]
        .as_array()
        .map(|machines| {
            machines
                .iter()
                .filter_map(|m| Some((m["instance_id"].as_str()?.to_owned(), m["pid"].as_i64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Kills a machine's `systemd-nspawn` (pid from the lab's status) with SIGKILL, as a host
/// failure would.
fn kill_machine(pid: i64) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}
