//! Crash safety on AWS, against moto's server: `rigger up`, `deploy`, `db promote`,
//! `db reseed` and `down`, each killed with SIGKILL right after the answer to a random one of
//! its AWS calls (the call took effect; rigger never saw its answer), then run again. After
//! each re-run the environment must have converged: the next plan is empty, the deploy lock is
//! free, the history is consistent (a deploy cut off after taking the lock is recorded
//! `interrupted`), and nothing is orphaned in the emulator: every instance, network
//! interface, volume, launch template, Auto Scaling group and SSM parameter is the
//! environment's, tagged, and in use, every release object in the bucket is in the history.
//! After `down`, nothing of the environment is left.
//!
//! The kill comes from rigger's own crash-test hook (`rigger_aws::client`, armed by
//! `RIGGER_TEST_KILL_AFTER_AWS_CALLS` only with `--endpoint-url`). Each command's calls are
//! counted in a first run; the cut is drawn from 1..=that count with a seed printed at the
//! start (`CHAOS_SEED=N` repeats a run).

mod hermetic;
use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;

#[path = "../../rigger-aws/tests/common/mod.rs"]
mod moto;

mod aws_cli;
use aws_cli::{git, json, ok, rigger, stdout, text};

/// A small deterministic generator (xorshift64*): the seed is printed, so a failing cut can
/// be run again.
struct Draw(u64);

impl Draw {
    fn seeded() -> Draw {
        let seed = std::env::var("CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("CHAOS_SEED={seed}");
        Draw(seed | 1)
    }

    /// A number in `1..=most`.
    fn cut(&mut self, most: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        1 + self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % most.max(1)
    }
}

/// Runs `rigger ARGS` to the end with the hook logging its AWS calls: the operation of each,
/// in order.
fn counted(dir: &Path, url: &str, args: &[&str]) -> Vec<String> {
    let log = dir.join("calls.log");
    let _ = std::fs::remove_file(&log);
    let output = rigger(dir, url, args)
        .env("RIGGER_TEST_AWS_CALL_LOG", &log)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "rigger {args:?}: {}",
        text(&output)
    );
    let calls: Vec<String> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .map(|line| line.split_once(' ').map_or(line, |(_, op)| op).to_owned())
        .collect();
    assert!(!calls.is_empty(), "rigger {args:?} made no AWS call");
    calls
}

/// The number of the first call of `operation` (1-based), which must be among `calls`.
fn first_call_of(calls: &[String], operation: &str) -> u64 {
    1 + calls
        .iter()
        .position(|op| op == operation)
        .unwrap_or_else(|| panic!("no {operation} among {calls:?}")) as u64
}

/// Runs `rigger ARGS` killed right after its `cut`-th AWS call's answer; returns the last
/// call it made (from the hook's log), for the messages.
fn killed(dir: &Path, url: &str, args: &[&str], cut: u64) -> String {
    let log = dir.join("calls.log");
    let _ = std::fs::remove_file(&log);
    let output = rigger(dir, url, args)
        .env("RIGGER_TEST_AWS_CALL_LOG", &log)
        .env("RIGGER_TEST_KILL_AFTER_AWS_CALLS", cut.to_string())
        .output()
        .unwrap();
    assert_eq!(
        output.status.signal(),
        Some(9),
        "rigger {args:?} was not killed after call {cut}: {:?} {}",
        output.status,
        text(&output)
    );
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    let last = calls.lines().last().unwrap_or("none").to_owned();
    eprintln!("killed rigger {args:?} after AWS call {last}");
    last
}

fn plan_is_empty(dir: &Path, url: &str, after: &str) {
    let plan = ok(dir, url, &["plan"]);
    assert!(
        stdout(&plan).contains("No changes"),
        "{after}: the plan is not empty: {}",
        text(&plan)
    );
}

fn lock_is_free(dir: &Path, url: &str, after: &str) {
    let status = ok(dir, url, &["lock", "status"]);
    assert!(
        !stdout(&status).contains("held by") && !stdout(&status).contains("stale"),
        "{after}: the deploy lock is still there: {}",
        text(&status)
    );
}

/// `rigger releases --json`: (id, result) of each deploy, oldest first.
fn history(dir: &Path, url: &str) -> Vec<(String, String)> {
    json(dir, url, &["releases", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["release"].as_str().unwrap_or_default().to_owned(),
                r["result"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Everything the emulator holds, as the audit needs it.
#[derive(Debug, Default)]
struct Inventory {
    /// (instance id, state, tagged with the environment, its `Name` tag)
    instances: Vec<(String, String, bool, String)>,
    /// (interface id, status, the instance it is attached to)
    interfaces: Vec<(String, String, Option<String>)>,
    /// (volume id, state, attached to)
    volumes: Vec<(String, String, Option<String>)>,
    /// (template name, tagged, its default version's user-data script)
    templates: Vec<(String, bool, String)>,
    /// (group name, instance ids)
    groups: Vec<(String, Vec<String>)>,
    parameters: Vec<String>,
    /// object keys of every bucket, `bucket/key`
    objects: Vec<String>,
    load_balancers: Vec<String>,
    security_groups: Vec<String>,
}

fn tagged_for_the_environment<'a>(
    tags: impl IntoIterator<Item = (Option<&'a str>, Option<&'a str>)>,
) -> bool {
    let tags: Vec<_> = tags.into_iter().collect();
    tags.contains(&(Some("project"), Some("shop")))
        && tags.contains(&(Some("environment"), Some("prod")))
}

fn inventory(moto: &moto::Moto) -> Inventory {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let c = rigger_aws::Clients::connect(&moto.connection()).await;
        let mut found = Inventory::default();
        let instances = c.ec2.describe_instances().send().await.unwrap();
        for instance in instances.reservations().iter().flat_map(|r| r.instances()) {
            let state = instance
                .state()
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_owned())
                .unwrap_or_default();
            let tagged =
                tagged_for_the_environment(instance.tags().iter().map(|t| (t.key(), t.value())));
            let name = instance
                .tags()
                .iter()
                .find(|t| t.key() == Some("Name"))
                .and_then(|t| t.value())
                .unwrap_or_default()
                .to_owned();
            found.instances.push((
                instance.instance_id().unwrap_or_default().to_owned(),
                state,
                tagged,
                name,
            ));
        }
        let interfaces = c.ec2.describe_network_interfaces().send().await.unwrap();
        for interface in interfaces.network_interfaces() {
            found.interfaces.push((
                interface
                    .network_interface_id()
                    .unwrap_or_default()
                    .to_owned(),
                interface
                    .status()
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_default(),
                interface
                    .attachment()
                    .and_then(|a| a.instance_id())
                    .map(str::to_owned),
            ));
        }
        let volumes = c.ec2.describe_volumes().send().await.unwrap();
        for volume in volumes.volumes() {
            found.volumes.push((
                volume.volume_id().unwrap_or_default().to_owned(),
                volume
                    .state()
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_default(),
                volume
                    .attachments()
                    .first()
                    .and_then(|a| a.instance_id())
                    .map(str::to_owned),
            ));
        }
        let templates = c.ec2.describe_launch_templates().send().await.unwrap();
        for template in templates.launch_templates() {
            let tagged =
                tagged_for_the_environment(template.tags().iter().map(|t| (t.key(), t.value())));
            let name = template.launch_template_name().unwrap_or_default();
            let user_data = rigger_aws::userdata::default_version_script(&c.ec2, name)
                .await
                .unwrap();
            found.templates.push((name.to_owned(), tagged, user_data));
        }
        let groups = c
            .autoscaling
            .describe_auto_scaling_groups()
            .send()
            .await
            .unwrap();
        for group in groups.auto_scaling_groups() {
            found.groups.push((
                group
                    .auto_scaling_group_name()
                    .unwrap_or_default()
                    .to_owned(),
                group
                    .instances()
                    .iter()
                    .filter_map(|i| i.instance_id().map(str::to_owned))
                    .collect(),
            ));
        }
        let parameters = c
            .ssm
            .get_parameters_by_path()
            .path("/")
            .recursive(true)
            .send()
            .await
            .unwrap();
        found.parameters = parameters
            .parameters()
            .iter()
            .filter_map(|p| p.name().map(str::to_owned))
            .collect();
        let buckets = c.s3.list_buckets().send().await.unwrap();
        for bucket in buckets.buckets() {
            let name = bucket.name().unwrap_or_default();
            let objects = c.s3.list_objects_v2().bucket(name).send().await.unwrap();
            for object in objects.contents() {
                found
                    .objects
                    .push(format!("{name}/{}", object.key().unwrap_or_default()));
            }
        }
        let lbs = c.elb.describe_load_balancers().send().await.unwrap();
        found.load_balancers = lbs
            .load_balancer_descriptions()
            .iter()
            .filter_map(|lb| lb.load_balancer_name().map(str::to_owned))
            .collect();
        let groups = c.ec2.describe_security_groups().send().await.unwrap();
        found.security_groups = groups
            .security_groups()
            .iter()
            .filter_map(|g| g.group_name())
            .filter(|name| *name != "default")
            .map(str::to_owned)
            .collect();
        found
    })
}

/// The environment is up and nothing in the emulator is orphaned.
fn audit_live(moto: &moto::Moto, dir: &Path, after: &str) {
    let url = moto.url.as_str();
    plan_is_empty(dir, url, after);
    lock_is_free(dir, url, after);
    let found = inventory(moto);
    let report = format!("{after}: {found:#?}");

    // Every instance not terminated is the environment's, and is a server it knows: in a
    // group, a stand-alone server of `rigger status` (one instance each), or a fenced
    // database server.
    let status = json(dir, url, &["status", "--json"]);
    let db = json(dir, url, &["db", "status", "--json"]);
    let in_groups: BTreeSet<&str> = found
        .groups
        .iter()
        .flat_map(|(_, ids)| ids.iter().map(String::as_str))
        .collect();
    let stand_alone: BTreeSet<String> = status["servers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["id"].as_str())
        .map(|id| format!("shop-prod-{id}"))
        .collect();
    let fenced: BTreeSet<&str> = db["servers"]["fenced"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["instance_id"].as_str())
        .collect();
    let live: Vec<_> = found
        .instances
        .iter()
        .filter(|(_, state, _, _)| state != "terminated" && state != "shutting-down")
        .collect();
    let mut names_seen = BTreeSet::new();
    for (id, state, tagged, name) in &live {
        assert!(*tagged, "instance {id} ({state}) is not tagged: {report}");
        if in_groups.contains(id.as_str()) || fenced.contains(id.as_str()) {
            continue;
        }
        assert!(
            stand_alone.contains(name),
            "instance {id} ({state}, {name}) is in no group, no status and not fenced: {report}"
        );
        assert!(
            names_seen.insert(name),
            "two live instances are {name}: {report}"
        );
    }
    let live_ids: BTreeSet<&str> = live.iter().map(|(id, _, _, _)| id.as_str()).collect();
    // Network interfaces: each attached to a live server (moto's own leftovers aside).
    for (id, status, attached) in left_by_instances(&found) {
        assert!(
            attached.as_deref().is_some_and(|i| live_ids.contains(i)),
            "interface {id} ({status}) is attached to no live server: {report}"
        );
    }
    // Volumes: each attached to a live instance.
    for (id, state, attached) in &found.volumes {
        assert!(
            attached.as_deref().is_some_and(|i| live_ids.contains(i)),
            "volume {id} ({state}) is attached to no live server: {report}"
        );
    }
    // Launch templates: the environment's only, and the servers they launch boot pointing
    // at the primary where it is now (a failover cut off before repointing them would leave
    // new servers on the fenced one).
    let fenced_addresses: Vec<String> = db["servers"]["fenced"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["address"].as_str().map(str::to_owned))
        .collect();
    let primary_address = db["servers"]["primary"]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("{after}: no primary address in {db:#}"));
    for (name, tagged, user_data) in &found.templates {
        assert!(
            *tagged && name.starts_with("shop-prod-"),
            "template {name}: {report}"
        );
        let stunnel = rigger_aws::userdata::file_in(user_data, "stunnel.conf")
            .unwrap_or_else(|| panic!("{after}: no stunnel.conf in template {name}"));
        assert!(
            stunnel.contains(&format!("connect = {primary_address}:")),
            "{after}: template {name} launches servers pointing elsewhere than the primary {primary_address}: {stunnel}"
        );
        for old in &fenced_addresses {
            assert!(
                !stunnel.contains(&format!("connect = {old}:")),
                "{after}: template {name} launches servers pointing at the fenced primary {old}"
            );
        }
    }
    for name in &found.parameters {
        assert!(
            name.starts_with("/shop/prod/"),
            "parameter {name}: {report}"
        );
        if let Some(instance) = name.strip_prefix("/shop/prod/hostkeys/") {
            assert!(
                live_ids.contains(instance),
                "host keys of a gone instance: {name}: {report}"
            );
        }
    }
    // Release objects: each one a release in the history (or the first release).
    let releases: BTreeSet<String> = history(dir, url).into_iter().map(|(id, _)| id).collect();
    for object in &found.objects {
        let Some(release) = object
            .split_once("/releases/")
            .and_then(|(_, name)| name.strip_suffix(".tar.gz"))
        else {
            assert!(
                !object.ends_with("deploy/lock.json"),
                "the deploy lock is left: {report}"
            );
            continue;
        };
        assert!(
            release == "initial" || releases.contains(release),
            "release object {object} is in no deploy of the history {releases:?}: {report}"
        );
    }
    eprintln!(
        "{after}: converged; {} live instances, {} interfaces, {} volumes, {} templates, {} parameters, {} objects",
        live.len(),
        found.interfaces.len(),
        found.volumes.len(),
        found.templates.len(),
        found.parameters.len(),
        found.objects.len()
    );
}

/// The network interfaces that are not moto's leftovers: moto keeps the primary interface of
/// an instance a group terminated, still `in-use` by it, where AWS deletes it with the
/// instance (`DeleteOnTermination`); nobody could delete it on AWS, so it is no orphan.
fn left_by_instances(found: &Inventory) -> Vec<&(String, String, Option<String>)> {
    let terminated: BTreeSet<&str> = found
        .instances
        .iter()
        .filter(|(_, state, _, _)| state == "terminated")
        .map(|(id, _, _, _)| id.as_str())
        .collect();
    found
        .interfaces
        .iter()
        .filter(|(_, _, attached)| !attached.as_deref().is_some_and(|i| terminated.contains(i)))
        .collect()
}

/// Nothing of the environment is left.
fn audit_gone(moto: &moto::Moto, after: &str) {
    let found = inventory(moto);
    let report = format!("{after}: {found:#?}");
    assert!(
        found
            .instances
            .iter()
            .all(|(_, state, _, _)| state == "terminated"),
        "{report}"
    );
    assert!(left_by_instances(&found).is_empty(), "{report}");
    assert!(found.volumes.is_empty(), "{report}");
    assert!(found.templates.is_empty(), "{report}");
    assert!(found.groups.is_empty(), "{report}");
    assert!(found.load_balancers.is_empty(), "{report}");
    assert!(found.security_groups.is_empty(), "{report}");
    assert!(
        found.parameters.iter().all(|p| !p.starts_with("/shop/")),
        "{report}"
    );
}

fn commit(app: &Path, version: &str) {
    std::fs::write(app.join("manage.py"), format!("print('{version}')\n")).unwrap();
    git(app, &["commit", "-qam", version]);
}

const FAST: [&str; 4] = ["--health-timeout", "60", "--drain-timeout", "0"];

fn with_fast<'a>(args: &[&'a str]) -> Vec<&'a str> {
    [args, &FAST[..]].concat()
}

#[test]
fn every_command_killed_after_any_aws_call_converges_when_run_again() {
    let mut draw = Draw::seeded();
    let moto = moto::Moto::start();
    let url = moto.url.as_str();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config =
        moto::config_text("", 2, "t3.small").replace("app_path = \".\"", "app_path = \"app\"");
    std::fs::write(dir.join("rigger.toml"), config).unwrap();
    let app = dir.join("app");
    aws_cli::committed_app(&app);

    // The calls of up and down from nothing, counted.
    let up_calls = counted(dir, url, &["up"]).len() as u64;
    audit_live(&moto, dir, "up");
    let down_calls = counted(dir, url, &["down", "--yes"]).len() as u64;
    audit_gone(&moto, "down");
    eprintln!("up makes {up_calls} AWS calls, down {down_calls}");

    // up, killed.
    let cut = draw.cut(up_calls);
    killed(dir, url, &["up"], cut);
    ok(dir, url, &["up"]);
    audit_live(
        &moto,
        dir,
        &format!("up killed after call {cut}, run again"),
    );

    // deploy: counted, then killed and run again.
    commit(&app, "v2");
    let deploy_calls = counted(dir, url, &with_fast(&["deploy"])).len() as u64;
    audit_live(&moto, dir, "deploy");
    commit(&app, "v3");
    let cut = draw.cut(deploy_calls);
    killed(dir, url, &with_fast(&["deploy"]), cut);
    let before_rerun = history(dir, url);
    let again = ok(dir, url, &with_fast(&["deploy"]));
    let after = format!("deploy killed after call {cut} of {deploy_calls}, run again");
    audit_live(&moto, dir, &after);
    let deployed = stdout(&again).trim().to_owned();
    let status = json(dir, url, &["status", "--json"]);
    assert_eq!(status["release"], deployed.as_str(), "{after}: {status:#}");
    let releases = history(dir, url);
    assert_eq!(
        releases
            .last()
            .map(|(id, result)| (id.as_str(), result.as_str())),
        Some((deployed.as_str(), "succeeded")),
        "{after}: {releases:?}"
    );
    // A deploy cut off holding the lock is in the history as interrupted, once.
    let interrupted = releases.iter().filter(|(_, r)| r == "interrupted").count();
    assert!(
        interrupted <= 1,
        "{after}: {releases:?} (before: {before_rerun:?})"
    );
    eprintln!("{after}: history {releases:?}");

    // db promote: counted (then up builds the replica again), then killed at a random call,
    // and right after it made the first launch template's new version (the replica is the
    // primary, the templates half rewritten: what a re-run that found no replica to promote
    // used to leave pointing new servers at the fenced primary), and run again each time.
    let promote_calls = counted(dir, url, &["db", "promote"]);
    ok(dir, url, &["up"]);
    audit_live(&moto, dir, "promote, then up");
    let half_rewritten = first_call_of(&promote_calls, "CreateLaunchTemplateVersion");
    for cut in [draw.cut(promote_calls.len() as u64), half_rewritten] {
        killed(dir, url, &["db", "promote"], cut);
        let after = format!(
            "db promote killed after call {cut} of {}, run again",
            promote_calls.len()
        );
        // Until it is finished, up refuses (or, cut before it changed anything, has nothing
        // to do).
        let early_up = rigger(dir, url, &["up"]).output().unwrap();
        assert!(
            early_up.status.success() || text(&early_up).contains("run `rigger db promote` again"),
            "{after}: up: {}",
            text(&early_up)
        );
        finish_promote(dir, url, &after);
        ok(dir, url, &["up"]);
        audit_live(&moto, dir, &after);
        let db = json(dir, url, &["db", "status", "--json"]);
        assert_eq!(
            db["servers"]["replicas"].as_array().map(Vec::len),
            Some(1),
            "{after}: {db:#}"
        );
    }

    // db reseed: counted (up builds the replica again), then killed and run again.
    let reseed_calls = counted(dir, url, &["db", "reseed"]).len() as u64;
    ok(dir, url, &["up"]);
    audit_live(&moto, dir, "reseed, then up");
    let cut = draw.cut(reseed_calls);
    killed(dir, url, &["db", "reseed"], cut);
    let after = format!("db reseed killed after call {cut} of {reseed_calls}, run again");
    let again = rigger(dir, url, &["db", "reseed"]).output().unwrap();
    eprintln!("{after}: {}", text(&again));
    ok(dir, url, &["up"]);
    audit_live(&moto, dir, &after);

    // down, killed and run again: nothing left.
    let cut = draw.cut(down_calls);
    killed(dir, url, &["down", "--yes"], cut);
    ok(dir, url, &["down", "--yes"]);
    audit_gone(&moto, &format!("down killed after call {cut}, run again"));
}

/// Runs `db promote` again after one was killed: it finishes the failover the killed one
/// began (or, cut off before it recorded one, makes it).
fn finish_promote(dir: &Path, url: &str, after: &str) {
    let again = ok(dir, url, &["db", "promote"]);
    eprintln!("{after}: {}", text(&again));
}
