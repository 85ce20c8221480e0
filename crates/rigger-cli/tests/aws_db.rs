//! `rigger db` on AWS from the command line, against moto's server: `db status` (human and
//! JSON), `db promote` of an unknown replica (refused, nothing changed) and of the first
//! replica (the old primary fenced, the replica the primary, `plan` wanting only a new
//! replica, which `up` builds), `db backups`, `db restore` (an unknown backup refused; an
//! existing one refused without a terminal unless `--yes`), `down`. Moto's servers cannot be
//! reached, so every SSH step is skipped with a note; the AWS calls run for real.

mod hermetic;
use std::path::Path;

use serde_json::Value;

#[path = "../../rigger-aws/tests/common/mod.rs"]
mod moto;

mod aws_cli;
use aws_cli::{json, ok, rigger, stdout, text};

/// `rigger plan --json`'s steps other than no-ops: `create server shop-prod-db-replica1`.
fn planned(dir: &Path, url: &str) -> Vec<String> {
    let plan = json(dir, url, &["plan", "--json"]);
    assert_eq!(plan["schema"], "rigger.plan", "{plan}");
    plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["action"] != "no_op")
        .map(|s| {
            format!(
                "{} {} {}",
                s["action"].as_str().unwrap(),
                s["kind"].as_str().unwrap(),
                s["name"].as_str().unwrap()
            )
        })
        .collect()
}

fn assert_no_changes(dir: &Path, url: &str) {
    let plan = ok(dir, url, &["plan"]);
    assert!(stdout(&plan).contains("No changes"), "{}", text(&plan));
    assert_eq!(planned(dir, url), Vec::<String>::new());
}

/// A server of `db status --json`'s `servers`: (name, recipe id, instance id, EC2 state).
fn server(value: &Value) -> (String, String, String, String) {
    let field = |key: &str| {
        value[key]
            .as_str()
            .unwrap_or_else(|| panic!("no {key} in {value}"))
            .to_owned()
    };
    (
        field("name"),
        field("id"),
        field("instance_id"),
        field("state"),
    )
}

/// Puts an object into moto's S3 with a bare request (moto checks no signature; the AWS
/// SDK is not a dependency of the CLI's tests). Returns the HTTP status line.
fn s3_request(url: &str, method: &str, path: &str, body: &[u8]) -> String {
    use std::io::{Read as _, Write as _};
    let address = url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// The environment's bucket, found in moto's bucket list by its prefix.
fn bucket(url: &str) -> String {
    let listing = s3_request(url, "GET", "/", b"");
    let names: Vec<&str> = listing
        .split("<Name>")
        .skip(1)
        .filter_map(|rest| rest.split("</Name>").next())
        .filter(|name| name.starts_with("shop-prod-releases-"))
        .collect();
    assert_eq!(names.len(), 1, "{listing}");
    names[0].to_owned()
}

#[test]
fn db_status_promote_backups_and_restore_from_the_command_line() {
    let moto = moto::Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let url = moto.url.as_str();
    std::fs::write(
        dir.path().join("rigger.toml"),
        moto::config_text("", 1, "t3.small"),
    )
    .unwrap();
    let dir = dir.path();
    aws_cli::committed_app(dir);

    ok(dir, url, &["up"]);
    assert_no_changes(dir, url);

    // Status: the primary and the replica, from the API; replication not asked.
    let human = ok(dir, url, &["db", "status"]);
    let lines = stdout(&human);
    let role_of = |lines: &str, name: &str| -> Vec<String> {
        lines
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some(name))
            .map(|l| l.split_whitespace().next().unwrap().to_owned())
            .collect()
    };
    assert_eq!(role_of(&lines, "db-primary"), ["primary"], "{lines}");
    // The replica is one server, and its replication (not asked) a separate line.
    assert_eq!(
        role_of(&lines, "db-replica1"),
        ["replica", "replication"],
        "{lines}"
    );
    assert!(!lines.contains("NaN"), "{lines}");
    assert!(
        String::from_utf8_lossy(&human.stderr).contains("not asked"),
        "the skipped SSH parts are not mentioned: {}",
        text(&human)
    );
    let before = json(dir, url, &["db", "status", "--json"]);
    assert_eq!(before["primary"], "db-primary", "{before:#}");
    let (name, id, old_primary, state) = server(&before["servers"]["primary"]);
    assert_eq!(
        (name.as_str(), id.as_str(), state.as_str()),
        ("db-primary", "db-primary", "running")
    );
    let replicas = before["servers"]["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 1, "{before:#}");
    let (name, id, replica, _) = server(&replicas[0]);
    assert_eq!((name.as_str(), id.as_str()), ("db-replica1", "db-replica1"));
    assert_ne!(replica, old_primary);
    // Replication was not asked: the replica is listed, its state unknown.
    let rows = before["replicas"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{before:#}");
    assert_eq!(rows[0]["id"], "db-replica1");
    assert_eq!(rows[0]["state"], "unknown");
    assert_eq!(before["servers"]["fenced"], serde_json::json!([]));

    // An unknown replica: refused with the replicas' names, nothing changed.
    let unknown = rigger(dir, url, &["db", "promote", "db-replica7"])
        .output()
        .unwrap();
    assert!(
        matches!(unknown.status.code(), Some(1 | 2)),
        "{:?}: {}",
        unknown.status,
        text(&unknown)
    );
    let message = text(&unknown);
    assert!(
        message.contains("db-replica7") && message.contains("the replicas are: db-replica1"),
        "{message}"
    );
    // Nor is the primary a replica to promote.
    let primary = rigger(dir, url, &["db", "promote", "db-primary"])
        .output()
        .unwrap();
    assert!(matches!(primary.status.code(), Some(1 | 2)));
    assert!(
        text(&primary).contains("it is the primary"),
        "{}",
        text(&primary)
    );
    assert_no_changes(dir, url);
    assert_eq!(json(dir, url, &["db", "status", "--json"]), before);

    // Promote the first replica: the SSH parts skipped, the AWS parts done.
    let promoted = ok(dir, url, &["db", "promote"]);
    let said = text(&promoted);
    assert!(said.contains("skipped"), "{said}");
    assert!(said.contains(&old_primary), "{said}");
    assert!(said.contains("rigger up -e prod"), "{said}");
    // PgBouncer was not paused: no writes were held.
    assert!(!said.contains("writes held"), "{said}");
    let after = json(dir, url, &["db", "status", "--json"]);
    assert_eq!(after["primary"], "db-primary", "{after:#}");
    let (name, id, instance, _) = server(&after["servers"]["primary"]);
    assert_eq!(
        (name.as_str(), id.as_str(), instance.as_str()),
        ("db-primary", "db-replica1", replica.as_str()),
        "the former replica is not the primary: {after:#}"
    );
    assert_eq!(after["servers"]["replicas"], serde_json::json!([]));
    let fenced = after["servers"]["fenced"].as_array().unwrap();
    assert_eq!(fenced.len(), 1, "{after:#}");
    let (name, id, instance, state) = server(&fenced[0]);
    assert_eq!(
        (name.as_str(), id.as_str(), instance.as_str()),
        ("db-primary-old", "db-primary", old_primary.as_str())
    );
    assert!(matches!(state.as_str(), "stopped" | "stopping"), "{state}");
    let human = stdout(&ok(dir, url, &["db", "status"]));
    assert_eq!(role_of(&human, "db-primary"), ["primary"], "{human}");
    assert_eq!(role_of(&human, "db-primary-old"), ["fenced"], "{human}");
    assert_eq!(
        role_of(&human, "db-replica1"),
        Vec::<String>::new(),
        "{human}"
    );

    // The promote held the deploy lock while it ran, and gave it back.
    let lock = stdout(&ok(dir, url, &["lock", "status"]));
    assert_eq!(lock.trim(), "free", "{lock}");
    // While someone else's deploy holds the lock, a promote is refused, naming the holder.
    let holder = serde_json::json!({
        "id": "00000000000000ab", "who": "ci@build-host", "pid": 7,
        "operation": "deploy 20261127T000000Z-abc",
        "since": 1_795_000_000u64, "expires": 4_000_000_000u64,
    });
    let put = s3_request(
        url,
        "PUT",
        &format!("/{}/deploy/lock.json", bucket(url)),
        holder.to_string().as_bytes(),
    );
    assert!(put.starts_with("HTTP/1.1 200"), "{put}");
    let refused = rigger(dir, url, &["db", "promote"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        text(&refused).contains("held by ci@build-host"),
        "{}",
        text(&refused)
    );
    // A live holder's lock goes only with its id.
    let kept = rigger(dir, url, &["lock", "release"]).output().unwrap();
    assert_eq!(kept.status.code(), Some(1), "{}", text(&kept));
    assert!(
        text(&kept).contains("`rigger lock release --id 00000000000000ab`"),
        "{}",
        text(&kept)
    );
    let status = stdout(&ok(dir, url, &["lock", "status"]));
    assert!(status.contains("lock id 00000000000000ab"), "{status}");
    ok(dir, url, &["lock", "release", "--id", "00000000000000ab"]);
    let lock = stdout(&ok(dir, url, &["lock", "status"]));
    assert_eq!(lock.trim(), "free", "{lock}");

    // No replica left to promote until `up` builds one.
    let none = rigger(dir, url, &["db", "promote"]).output().unwrap();
    assert_eq!(none.status.code(), Some(1), "{}", text(&none));
    assert!(
        text(&none).contains("no replica") && text(&none).contains("rigger up"),
        "{}",
        text(&none)
    );

    // The plan wants only a new replica (the fenced server neither deleted nor reused).
    assert_eq!(
        planned(dir, url),
        [
            "create volume shop-prod-db-replica1-data",
            "create server shop-prod-db-replica1",
        ]
    );
    ok(dir, url, &["up"]);
    assert_no_changes(dir, url);
    let rebuilt = json(dir, url, &["db", "status", "--json"]);
    let (_, _, instance, _) = server(&rebuilt["servers"]["primary"]);
    assert_eq!(instance, replica, "{rebuilt:#}");
    let replicas = rebuilt["servers"]["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 1, "{rebuilt:#}");
    let (name, id, instance, _) = server(&replicas[0]);
    assert_eq!((name.as_str(), id.as_str()), ("db-replica1", "db-replica2"));
    assert!(
        instance != replica && instance != old_primary,
        "{rebuilt:#}"
    );
    assert_eq!(rebuilt["servers"]["fenced"].as_array().unwrap().len(), 1);
    // The groups launch from the templates the failover pointed at the new primary.
    ok(dir, url, &["scale", "web=3"]);

    // Backups: none at first, and that is not an error.
    let listed = ok(dir, url, &["db", "backups"]);
    assert_eq!(stdout(&listed).trim(), "", "{}", text(&listed));
    // pg_dump cannot run on moto's servers: no backup, and no name printed for one.
    let backup = ok(dir, url, &["db", "backup"]);
    assert_eq!(stdout(&backup), "", "{}", text(&backup));
    assert!(
        text(&backup).contains("pg_dump skipped") && text(&backup).contains("no backup made"),
        "{}",
        text(&backup)
    );
    let listed = ok(dir, url, &["db", "backups"]);
    assert_eq!(stdout(&listed).trim(), "", "{}", text(&listed));

    // Restoring a backup that does not exist: refused, saying how to list them.
    let missing = rigger(
        dir,
        url,
        &["db", "restore", "shop-20260101T000000Z.dump", "--yes"],
    )
    .output()
    .unwrap();
    assert_eq!(missing.status.code(), Some(2), "{}", text(&missing));
    assert!(
        text(&missing).contains("no backup `shop-20260101T000000Z.dump`")
            && text(&missing).contains("rigger db backups"),
        "{}",
        text(&missing)
    );

    // A backup in the bucket (as the primary's upload would leave it) is listed; restoring it
    // without a terminal is refused unless --yes.
    let bucket = bucket(url);
    let name = "shop-20260101T000000Z.dump";
    let put = s3_request(url, "PUT", &format!("/{bucket}/backups/{name}"), b"PGDMP");
    assert!(put.starts_with("HTTP/1.1 200"), "{put}");
    let listed = ok(dir, url, &["db", "backups"]);
    assert_eq!(stdout(&listed).trim(), name, "{}", text(&listed));
    let unconfirmed = rigger(dir, url, &["db", "restore", name]).output().unwrap();
    assert_eq!(unconfirmed.status.code(), Some(2), "{}", text(&unconfirmed));
    assert!(
        text(&unconfirmed).contains("--yes"),
        "{}",
        text(&unconfirmed)
    );
    assert_eq!(json(dir, url, &["status", "--json"])["maintenance"], false);
    let restored = ok(dir, url, &["db", "restore", name, "--yes"]);
    let said = text(&restored);
    assert!(said.contains("pg_restore skipped"), "{said}");
    // Maintenance mode on and off again (recorded in SSM; web servers not switched).
    assert_eq!(
        said.matches("web servers not switched").count(),
        2,
        "{said}"
    );
    assert!(!said.contains(&format!("restored {name}")), "{said}");
    let status = json(dir, url, &["status", "--json"]);
    assert_eq!(status["maintenance"], false, "{status:#}");

    ok(dir, url, &["down", "--yes"]);
    // Nothing left, fenced servers included.
    let left = json(dir, url, &["db", "status", "--json"]);
    assert_eq!(left["primary"], Value::Null, "{left:#}");
    assert_eq!(
        left["servers"],
        serde_json::json!({"primary": null, "replicas": [], "fenced": []}),
        "{left:#}"
    );
}
