//! End to end: database operations on the local provider, on the real services. A planned
//! failover under steady writes through the site loses no acknowledged write, the site takes
//! writes again within 10 s, the old primary refuses connections; a replica is rebuilt from
//! the new primary; a backup restored gives back the same rows, and one cut short changes
//! nothing.
//! Needs root and the packages of scripts/install-packages.sh, like local_stack.rs.

mod common;
mod hermetic;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{AppSource, Site, curl, eventually};

const BLOCK: &str = "127.82";
const HTTPS_PORT: u16 = 20443;

fn site(path: &str) -> String {
    format!("https://{BLOCK}.0.1:{HTTPS_PORT}{path}")
}

fn db_status(stack: &Site) -> serde_json::Value {
    let output = stack.rigger(&["db", "status", "--json"]);
    assert!(output.status.success());
    serde_json::from_slice(&output.stdout).unwrap()
}

/// A query as postgres on a database server, over its Unix socket.
fn sql(stack: &Site, server: &str, query: &str) -> String {
    let socket = stack
        .env_dir()
        .join(format!("servers/{server}/run/postgresql"));
    let output = Command::new("setpriv")
        .args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
            "psql",
            "-XAtq",
            "-h",
        ])
        .arg(socket)
        .args(["-d", &stack.project, "-c", query])
        .env("HOME", "/tmp")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{query}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// POSTs a note; its id when the site acknowledged it.
fn write_note(text: &str) -> Result<i64, String> {
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        &format!(r#"{{"text":"{text}"}}"#),
        &site("/notes"),
    ]);
    if code != 201 {
        return Err(format!("{code}: {body}"));
    }
    let note: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    note["id"].as_i64().ok_or(body)
}

#[test]
#[ignore = "end to end: scripts/test runs it after the other tests (-- --ignored)"]
fn failover_reseed_backup_and_restore_on_real_postgres() {
    let stack = Site::new("dbops", 82, 20080, HTTPS_PORT, AppSource::Link);
    assert!(stack.rigger(&["up"]).status.success(), "rigger up failed");
    let status = db_status(&stack);
    assert_eq!(status["primary"], "db-primary", "{status}");
    assert_eq!(status["replicas"][0]["state"], "streaming", "{status}");
    assert!(status["replicas"][0]["slot"].as_str().is_some(), "{status}");
    // A replica with nothing left to replay is not lagged, whatever PostgreSQL last measured
    // (the site's beat writes now and then: wait for a moment with nothing to replay).
    let caught_up = eventually(
        "the replica to have nothing left to replay",
        Duration::from_secs(30),
        || {
            let status = db_status(&stack);
            (status["replicas"][0]["lag_bytes"] == 0).then_some(status)
        },
    );
    assert_eq!(caught_up["replicas"][0]["lag_seconds"], 0.0, "{caught_up}");
    assert_eq!(
        status["pgbouncers"].as_array().unwrap().len(),
        3,
        "{status}"
    );

    // Steady writes through the site while a planned failover runs.
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..2)
        .map(|writer| {
            let (stop, acknowledged, refused) =
                (stop.clone(), acknowledged.clone(), refused.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    match write_note(&format!("writer{writer}-{n}")) {
                        Ok(id) => acknowledged.lock().unwrap().push(id),
                        Err(error) => refused.lock().unwrap().push((Instant::now(), error)),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let promote = stack.rigger(&["db", "promote"]);
    let promoted_at = Instant::now();
    assert!(promote.status.success(), "the failover failed");
    // The site takes writes again within 10 s.
    eventually(
        "a write after the failover",
        Duration::from_secs(10),
        || write_note("after the failover").ok(),
    );
    eprintln!(
        "writes accepted again {:?} after promote returned",
        promoted_at.elapsed()
    );
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.join().unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 20,
        "too few writes to mean anything: {}",
        acknowledged.len()
    );
    eprintln!(
        "{} writes acknowledged, {} refused during the failover",
        acknowledged.len(),
        refused.lock().unwrap().len()
    );

    // Zero acknowledged rows lost: every one is on the new primary.
    let ids = acknowledged
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let found = sql(
        &stack,
        "db-replica1",
        &format!("SELECT count(*) FROM polls_note WHERE id IN ({ids})"),
    );
    assert_eq!(
        found,
        acknowledged.len().to_string(),
        "acknowledged writes missing on the new primary"
    );
    let status = db_status(&stack);
    assert_eq!(status["primary"], "db-replica1", "{status}");
    // The old primary refuses connections.
    let old = Command::new("psql")
        .args([&format!("host={BLOCK}.4.1 port=5432 dbname=dbops user=dbops sslmode=require connect_timeout=3"), "-c", "select 1"])
        .env("PGPASSWORD", "whatever")
        .output()
        .unwrap();
    assert!(!old.status.success());
    assert!(
        String::from_utf8_lossy(&old.stderr).contains("refused"),
        "{}",
        String::from_utf8_lossy(&old.stderr)
    );

    // Reseed: a replica of the new primary, streaming, with the rows.
    // A reseed returns once the new replica streams, not before.
    assert!(stack.rigger(&["db", "reseed"]).status.success());
    let status = db_status(&stack);
    assert_eq!(status["replicas"][0]["state"], "streaming", "{status}");
    let replica = status["replicas"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(replica, "db-replica2", "{status}");
    let note = write_note("after the reseed").unwrap();
    eventually(
        "the note on the new replica",
        Duration::from_secs(10),
        || {
            (sql(
                &stack,
                &replica,
                &format!("SELECT count(*) FROM polls_note WHERE id = {note}"),
            ) == "1")
                .then_some(())
        },
    );

    // Raising the replica count in rigger.toml and running `up` adds one.
    let config = std::fs::read_to_string(stack.dir.join("rigger.toml")).unwrap();
    std::fs::write(
        stack.dir.join("rigger.toml"),
        config.replacen("replicas = 1", "replicas = 2", 1),
    )
    .unwrap();
    let plan = stack.rigger(&["plan"]);
    assert!(
        String::from_utf8_lossy(&plan.stdout).contains("+ server dbops-local-db-replica2"),
        "{}",
        String::from_utf8_lossy(&plan.stdout)
    );
    let up = stack.rigger(&["up"]);
    assert!(up.status.success());
    assert!(!String::from_utf8_lossy(&up.stderr).contains("nothing to do"));
    let status = eventually("two replicas streaming", Duration::from_secs(30), || {
        let status = db_status(&stack);
        let streaming = status["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["state"] == "streaming")
            .count();
        (streaming == 2).then_some(status)
    });
    eprintln!("after raising the replica count: {status}");
    assert!(String::from_utf8_lossy(&stack.rigger(&["up"]).stderr).contains("nothing to do"));

    // An unplanned failover (`--force`: no pause, no wait) to a named replica says what may
    // be lost; the other replica is rebuilt from the new primary.
    let target = status["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .max()
        .unwrap();
    let forced = stack.rigger(&["db", "promote", "--force", &target]);
    assert!(forced.status.success());
    let said = String::from_utf8_lossy(&forced.stderr);
    assert!(said.contains(&format!("{target} is the primary")), "{said}");
    let status = eventually(
        "the other replica streaming from the new primary",
        Duration::from_secs(30),
        || {
            let status = db_status(&stack);
            (status["primary"] == target.as_str() && status["replicas"][0]["state"] == "streaming")
                .then_some(status)
        },
    );
    eprintln!("after the forced failover: {status}");
    // `rigger status` asks the new primary about replication (not the server named
    // db-primary, which is gone).
    let replication = eventually(
        "rigger status showing the replica streaming",
        Duration::from_secs(30),
        || {
            let output = stack.rigger(&["status", "--json"]);
            let status: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
            let replication = status["replication"].as_array()?.clone();
            replication
                .iter()
                .any(|r| r["state"] == "streaming")
                .then_some(replication)
        },
    );
    let replicas: Vec<&str> = status["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert!(
        replication
            .iter()
            .all(|r| replicas.contains(&r["id"].as_str().unwrap())),
        "{replication:?} vs {replicas:?}"
    );
    write_note("after the forced failover").unwrap();

    // The database history lists the operations, the forced one last, who asked and how each
    // ended.
    let history = stack.rigger(&["db", "history", "--json"]);
    assert!(
        history.status.success(),
        "{}",
        String::from_utf8_lossy(&history.stderr)
    );
    let history: Vec<serde_json::Value> = serde_json::from_slice(&history.stdout).unwrap();
    let last = history.last().expect("a database history");
    assert_eq!(last["operation"], "db promote", "{history:?}");
    assert_eq!(last["server"], target.as_str(), "{history:?}");
    assert_eq!(last["result"], "succeeded", "{history:?}");
    assert!(last["by"].as_str().unwrap().contains('@'), "{history:?}");
    assert!(
        history.iter().all(|r| r["result"] == "succeeded"),
        "{history:?}"
    );
    // A damaged answer file: the next operation is refused before anything is asked, naming
    // the file and what to do; with it removed, operations run again.
    let outcome = stack.env_dir().join("db/outcome.json");
    let kept = std::fs::read(&outcome).unwrap();
    std::fs::write(&outcome, &kept[..kept.len() / 2]).unwrap();
    let refused = stack.rigger(&["db", "reseed"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{said}");
    assert!(
        said.contains(&format!("{} is damaged (", outcome.display()))
            && said.contains("remove the file"),
        "{said}"
    );
    assert_eq!(
        serde_json::from_slice::<Vec<serde_json::Value>>(
            &stack.rigger(&["db", "history", "--json"]).stdout
        )
        .unwrap()
        .len(),
        history.len(),
        "a refused operation was performed"
    );
    std::fs::remove_file(&outcome).unwrap();

    // Backup, more writes, restore: the rows are those of the backup.
    let primary = db_status(&stack)["primary"].as_str().unwrap().to_owned();
    let rows_at_backup = sql(&stack, &primary, "SELECT count(*) FROM polls_note");
    let backup = stack.rigger(&["db", "backup"]);
    assert!(backup.status.success());
    let path = PathBuf::from(String::from_utf8_lossy(&backup.stdout).trim());
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    for n in 0..5 {
        write_note(&format!("after the backup {n}")).unwrap();
    }
    assert_ne!(
        sql(&stack, &primary, "SELECT count(*) FROM polls_note"),
        rows_at_backup
    );
    // A restore that fails half-way (a backup cut short) changes nothing: one transaction.
    let rows_now = sql(&stack, &primary, "SELECT count(*) FROM polls_note");
    let whole = std::fs::read(&path).unwrap();
    let cut = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cut.path(), &whole[..whole.len() * 3 / 4]).unwrap();
    let failed = stack.rigger(&["db", "restore", cut.path().to_str().unwrap(), "--yes"]);
    assert!(!failed.status.success(), "a cut backup restored");
    assert_eq!(
        sql(&stack, &primary, "SELECT count(*) FROM polls_note"),
        rows_now,
        "a failed restore left the database changed"
    );
    write_note("after the failed restore").unwrap();
    let name = path.file_name().unwrap().to_str().unwrap().to_owned();
    assert!(
        stack
            .rigger(&["db", "restore", &name, "--yes"])
            .status
            .success()
    );
    assert_eq!(
        sql(&stack, &primary, "SELECT count(*) FROM polls_note"),
        rows_at_backup
    );
    // The site works after the restore (maintenance mode is off again).
    write_note("after the restore").unwrap();
}
