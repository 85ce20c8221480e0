//! Real processes, started, signalled and stopped through `rigger_local::process`.
//!
//! Every test registers what it starts with a `Cleanup` guard that SIGKILLs the group on drop,
//! so a failing assertion leaves no process behind.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::geteuid;
use rigger_local::process::{
    self, PidRecord, ProcessError, ProcessSpec, StopOutcome, kill_now, spawn, stop, stop_leftovers,
    stop_supervised,
};
use tokio::time::Instant;

#[tokio::test]
async fn spawn_writes_a_pid_file_naming_the_live_process_in_its_own_group() {
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let spec = spec(dir.path(), "web-3/sleep", "sleep", &["1000"]);
    let mut sleep = spawn(&spec).await.unwrap();
    cleanup.add(sleep.record());

    let on_disk = PidRecord::read(&spec.pid_path).expect("pid file");
    assert_eq!(on_disk, sleep.record());
    assert_eq!(on_disk.pid, sleep.pid());
    assert_eq!(on_disk.name, "web-3/sleep");
    assert_eq!(on_disk.program, "sleep");
    assert_eq!(on_disk.start_time, stat(sleep.pid()).start_time);
    assert!(on_disk.is_alive());
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&spec.pid_path).unwrap()).unwrap();
    for key in ["pid", "start_time", "name", "program"] {
        assert!(json.get(key).is_some(), "{key} missing from {json}");
    }
    // Its own process group, so Ctrl-C on rigger's terminal does not reach it.
    assert_eq!(stat(sleep.pid()).pgrp, sleep.pid());
    assert_ne!(stat(sleep.pid()).pgrp, stat(std::process::id() as i32).pgrp);

    let started = Instant::now();
    let outcome = stop_supervised(&mut sleep, Signal::SIGTERM, Duration::from_secs(5)).await;
    assert_eq!(outcome, StopOutcome::Exited);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!on_disk.is_alive());
    assert!(!spec.pid_path.exists(), "pid file left behind");
    assert_eq!(sleep.try_wait().unwrap().map(|s| s.success()), Some(false));
}

#[tokio::test]
async fn a_process_ignoring_the_stop_signal_is_killed_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let spec = spec(
        dir.path(),
        "stubborn",
        "bash",
        &["-c", "trap '' TERM; echo trapped; sleep 1000"],
    );
    let mut stubborn = spawn(&spec).await.unwrap();
    cleanup.add(stubborn.record());
    // Signal only once the trap is installed; before that TERM would simply end bash.
    eventually("the trap to be installed", || {
        fs::read_to_string(&spec.log_path)
            .unwrap_or_default()
            .contains("trapped")
    })
    .await;

    let started = Instant::now();
    let outcome = stop_supervised(&mut stubborn, Signal::SIGTERM, Duration::from_millis(300)).await;
    assert_eq!(outcome, StopOutcome::Killed);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(group(stubborn.pid()), Vec::<i32>::new());
}

#[tokio::test]
async fn stop_reaches_every_process_of_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let spec = spec(dir.path(), "parent", "bash", &["-c", "sleep 1000 & wait"]);
    let mut parent = spawn(&spec).await.unwrap();
    cleanup.add(parent.record());
    let pid = parent.pid();
    eventually("the child to start", || group(pid).len() == 2).await;

    let outcome = stop_supervised(&mut parent, Signal::SIGTERM, Duration::from_secs(5)).await;
    assert_eq!(outcome, StopOutcome::Exited);
    assert_eq!(group(pid), Vec::<i32>::new());
}

#[tokio::test]
async fn the_stop_signal_goes_to_the_main_process_which_stops_its_children_its_own_way() {
    // As Celery's warm shutdown: on SIGTERM the main process waits for its child's work to
    // finish. Were the child signalled too, its work would be cut short.
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let finished = dir.path().join("child-finished");
    let script = format!(
        "(sleep 1; touch {}) & child=$!; trap 'wait $child; exit 0' TERM; wait",
        finished.display()
    );
    let spec = spec(dir.path(), "warm", "bash", &["-c", &script]);
    let mut main = spawn(&spec).await.unwrap();
    cleanup.add(main.record());
    let pid = main.pid();
    eventually("the child to start", || group(pid).len() >= 2).await;

    let outcome = stop_supervised(&mut main, Signal::SIGTERM, Duration::from_secs(10)).await;
    assert_eq!(outcome, StopOutcome::Exited);
    assert!(
        finished.exists(),
        "the child was stopped before its work was done"
    );
    assert_eq!(group(pid), Vec::<i32>::new());
}

#[tokio::test]
async fn members_outliving_their_leader_are_stopped_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let spec = spec(
        dir.path(),
        "daemonish",
        "bash",
        &["-c", "sleep 1000 & exit 0"],
    );
    let mut leader = spawn(&spec).await.unwrap();
    let record = leader.record();
    cleanup.add(record.clone());
    assert!(leader.wait().await.unwrap().success());
    assert!(!record.is_alive());
    assert_eq!(
        group(record.pid).len(),
        1,
        "the backgrounded sleep lives on"
    );

    let outcome = stop(&record, Signal::SIGTERM, Duration::from_secs(5)).await;
    assert_eq!(outcome, StopOutcome::Exited);
    assert_eq!(group(record.pid), Vec::<i32>::new());
    assert!(!spec.pid_path.exists());
}

#[tokio::test]
async fn kill_now_kills_the_whole_group_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let spec = spec(
        dir.path(),
        "guarded",
        "bash",
        &["-c", "trap '' TERM; sleep 1000 & wait"],
    );
    let mut guarded = spawn(&spec).await.unwrap();
    cleanup.add(guarded.record());
    let pid = guarded.pid();
    eventually("the child to start", || group(pid).len() == 2).await;

    assert!(kill_now(&guarded.record()));
    assert_eq!(
        guarded.wait().await.unwrap().code(),
        None,
        "killed by a signal"
    );
    eventually("the group to be gone", || group(pid).is_empty()).await;
    assert!(!kill_now(&guarded.record()));
}

#[tokio::test]
async fn a_reused_pid_is_never_signalled() {
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let spec = spec(dir.path(), "innocent", "sleep", &["1000"]);
    let mut innocent = spawn(&spec).await.unwrap();
    cleanup.add(innocent.record());
    // The record of an earlier process that had the same pid.
    let mut forged = innocent.record();
    forged.start_time -= 1;

    assert!(!forged.is_alive());
    assert_eq!(
        stop(&forged, Signal::SIGKILL, Duration::from_millis(100)).await,
        StopOutcome::NotRunning
    );
    assert!(matches!(
        process::signal(&forged, Signal::SIGKILL),
        Err(ProcessError::NotRunning { .. })
    ));
    assert!(!kill_now(&forged));
    assert!(
        innocent.record().is_alive(),
        "the innocent process was signalled"
    );
    assert!(
        spec.pid_path.exists(),
        "the live process's pid file was removed"
    );

    assert_eq!(innocent.stop().await, StopOutcome::Exited);
}

#[tokio::test]
async fn stop_leftovers_stops_what_a_crashed_supervisor_left() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut cleanup = Cleanup::default();
    let mut records = Vec::new();
    for name in ["web-1/sleep", "db-primary/sleep"] {
        let mut spec = spec(dir.path(), name, "sleep", &["1000"]);
        spec.pid_path = state.join(name).with_extension("pid");
        let supervised = spawn(&spec).await.unwrap();
        cleanup.add(supervised.record());
        records.push(supervised.record());
        // The supervisor dies: nobody stops the process, nobody removes the pid file.
        drop(supervised);
    }
    // A pid file of a process that already exited, and one that is not a record at all.
    let mut gone = spec(dir.path(), "cache/true", "true", &[]);
    gone.pid_path = state.join("cache/true.pid");
    let status = spawn(&gone).await.unwrap().wait().await.unwrap();
    assert!(status.success());
    fs::write(state.join("garbage.pid"), "not json").unwrap();
    fs::write(state.join("notes.txt"), "not a pid file").unwrap();

    let stopped = stop_leftovers(&state, Duration::from_secs(5)).await;
    assert_eq!(
        stopped,
        vec![
            ("cache/true".to_string(), StopOutcome::NotRunning),
            ("db-primary/sleep".to_string(), StopOutcome::Exited),
            ("web-1/sleep".to_string(), StopOutcome::Exited),
        ]
    );
    for record in &records {
        assert!(!record.is_alive(), "{} still runs", record.name);
    }
    // What is not a record of rigger's (a service's own pid file, as nginx writes) stays.
    let mut left = Vec::new();
    find_files(&state, &mut left);
    left.sort();
    assert_eq!(
        left,
        vec![state.join("garbage.pid"), state.join("notes.txt")]
    );
}

#[tokio::test]
async fn a_successor_keeps_what_it_may_adopt_and_stops_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut cleanup = Cleanup::default();
    let mut records = BTreeMap::new();
    for name in ["web-1/sleep", "web-9/sleep"] {
        let mut spec = spec(dir.path(), name, "sleep", &["1000"]);
        spec.pid_path = state.join(name).with_extension("pid");
        let supervised = spawn(&spec).await.unwrap();
        cleanup.add(supervised.record());
        let mut record = PidRecord::read(&spec.pid_path).unwrap();
        record.record_config_digest("abc").unwrap();
        records.insert(name, record);
        drop(supervised);
    }
    // web-9 is no longer one of the environment's servers.
    let (kept, stopped) = process::sort_leftovers(
        &state,
        |record| record.name.starts_with("web-1/"),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        stopped,
        vec![("web-9/sleep".to_string(), StopOutcome::Exited)]
    );
    assert!(!records["web-9/sleep"].is_alive());
    let adopted = &kept["web-1/sleep"];
    assert_eq!(adopted, &records["web-1/sleep"]);
    assert_eq!(
        adopted.config_digest, "abc",
        "the digest is read back from the pid file"
    );
    assert!(adopted.is_alive());
    assert!(state.join("web-1/sleep.pid").exists());
}

#[tokio::test]
async fn the_exit_of_a_process_another_started_is_seen() {
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let spec = spec(dir.path(), "web-1/sleep", "sleep", &["1000"]);
    let supervised = spawn(&spec).await.unwrap();
    let record = supervised.record();
    cleanup.add(record.clone());
    // As if another supervisor started it: this one never waits for the child.
    drop(supervised);
    let watched = record.clone();
    let watcher = tokio::spawn(async move { process::wait_for_exit(&watched).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!watcher.is_finished(), "the process still runs");
    kill_now(&record);
    tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .expect("the exit is seen at once")
        .unwrap()
        .unwrap();
    // A record of a process that is gone returns at once.
    tokio::time::timeout(Duration::from_secs(1), process::wait_for_exit(&record))
        .await
        .unwrap()
        .unwrap();
}

/// A directory a service user can write: anyone can (mode 0777); as root, it also belongs to
/// `nobody`, as Celery's run directory belongs to www-data.
fn service_dir(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    fs::create_dir_all(path).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o777)).unwrap();
    if geteuid().is_root() {
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        nix::unistd::chown(path, Some(nobody.uid), Some(nobody.gid)).unwrap();
    }
}

#[tokio::test]
async fn a_record_planted_where_a_service_user_writes_is_never_signalled() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut cleanup = Cleanup::default();
    // Any process of the machine (sshd, say): what a service user would like root to kill.
    let mut victim = spec(dir.path(), "victim", "sleep", &["1000"]);
    victim.pid_path = dir.path().join("elsewhere/victim.pid");
    let victim = spawn(&victim).await.unwrap();
    cleanup.add(victim.record());
    let record = serde_json::to_string(&victim.record()).unwrap();
    // The service's own run directory, inside the state directory rigger walks.
    let run = state.join("servers/worker-1/run/celery");
    service_dir(&run);
    fs::write(run.join("beat.pid"), &record).unwrap();
    // A record in root's own directory, but a file that is not root's (as root only: a
    // file of another user).
    let pids = state.join("servers/worker-1/pids");
    fs::create_dir_all(&pids).unwrap();
    fs::write(pids.join("planted.pid"), &record).unwrap();
    if geteuid().is_root() {
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        nix::unistd::chown(&pids.join("planted.pid"), Some(nobody.uid), None).unwrap();
    } else {
        fs::remove_file(pids.join("planted.pid")).unwrap();
    }

    assert_eq!(process::live_records(&state), Vec::<PidRecord>::new());
    let stopped = stop_leftovers(&state, Duration::from_secs(5)).await;
    assert!(
        stopped
            .iter()
            .all(|(_, outcome)| *outcome == StopOutcome::NotRunning),
        "{stopped:?}"
    );
    assert!(
        victim.record().is_alive(),
        "root signalled a planted record"
    );
    assert!(
        run.join("beat.pid").exists(),
        "root removed a service's file"
    );
}

#[tokio::test]
async fn pid_files_are_kept_only_where_nobody_else_can_write() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let open = dir.path().join("open");
    service_dir(&open);
    let mut unsafe_spec = spec(dir.path(), "unsafe", "sleep", &["1000"]);
    unsafe_spec.pid_path = open.join("pids/sleep.pid");
    match spawn(&unsafe_spec).await {
        Err(ProcessError::CreateDir { source, .. }) => {
            assert!(source.to_string().contains("can be written"), "{source}");
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(started) => {
            cleanup.add(started.record());
            panic!("a pid file was written where other users can write");
        }
    }

    let spec = spec(dir.path(), "web-1/sleep", "sleep", &["1000"]);
    let sleep = spawn(&spec).await.unwrap();
    cleanup.add(sleep.record());
    let pid_dir = spec.pid_path.parent().unwrap();
    assert_eq!(fs::metadata(pid_dir).unwrap().mode() & 0o7777, 0o700);
    assert_eq!(fs::metadata(&spec.pid_path).unwrap().mode() & 0o7777, 0o600);
}

#[tokio::test]
async fn a_user_process_runs_with_that_users_ids() {
    if !geteuid().is_root() {
        eprintln!("skipped: dropping privileges needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let mut spec = spec(dir.path(), "as-nobody", "sleep", &["1000"]);
    spec.user = Some("nobody".into());
    let mut sleep = spawn(&spec).await.unwrap();
    cleanup.add(sleep.record());
    // The pid is setpriv's until it has switched users and executed sleep; it stays the same
    // process (same pid and start time), so the record remains valid throughout.
    let comm = || fs::read_to_string(format!("/proc/{}/comm", sleep.pid())).unwrap_or_default();
    eventually("setpriv to execute sleep", || comm() == "sleep\n").await;

    let status = fs::read_to_string(format!("/proc/{}/status", sleep.pid())).unwrap();
    let ids = |key: &str| {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap();
        line[key.len()..]
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(ids("Uid:"), ["65534"; 4]);
    assert_eq!(ids("Gid:"), ["65534"; 4]);
    assert!(sleep.record().is_alive());
    assert_eq!(sleep.stop().await, StopOutcome::Exited);
}

#[tokio::test]
async fn the_environment_is_exactly_the_given_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let mut spec = spec(dir.path(), "env", "env", &[]);
    spec.env = BTreeMap::from([
        ("DJANGO_SETTINGS_MODULE".into(), "site.settings".into()),
        ("SPACED".into(), "two words".into()),
    ]);
    let mut env = spawn(&spec).await.unwrap();
    cleanup.add(env.record());
    assert!(env.wait().await.unwrap().success());

    let log = fs::read_to_string(&spec.log_path).unwrap();
    let mut lines: Vec<&str> = log.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "DJANGO_SETTINGS_MODULE=site.settings",
            &format!("PATH={}", process::DEFAULT_PATH),
            "SPACED=two words",
        ]
    );
}

#[tokio::test]
async fn the_log_is_appended_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let spec = spec(
        dir.path(),
        "echo",
        "bash",
        &["-c", "echo out; echo err >&2"],
    );
    for _ in 0..2 {
        let mut echo = spawn(&spec).await.unwrap();
        cleanup.add(echo.record());
        assert!(echo.wait().await.unwrap().success());
    }
    let log = fs::read_to_string(&spec.log_path).unwrap();
    assert_eq!(log.matches("out\n").count(), 2, "{log}");
    assert_eq!(log.matches("err\n").count(), 2, "{log}");
    assert_eq!(process::log_tail(&spec.log_path, 1).len(), 1);
}

#[tokio::test]
async fn a_missing_program_is_an_error_naming_it_and_leaves_no_pid_file() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path(), "web-3/nginx", "/nonexistent/nginx", &[]);
    let err = spawn(&spec).await.unwrap_err();
    assert_eq!(err.to_string(), "starting web-3/nginx (/nonexistent/nginx)");
    assert!(matches!(err, ProcessError::Start { .. }));
    assert!(!spec.pid_path.exists());
}

#[tokio::test]
async fn a_missing_program_run_as_a_user_is_the_same_error() {
    if !geteuid().is_root() {
        eprintln!("skipped: dropping privileges needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for program in ["/nonexistent/nginx", "no-such-program-rigger"] {
        let mut spec = spec(dir.path(), "web-3/nginx", program, &[]);
        spec.user = Some("nobody".into());
        let err = spawn(&spec).await.unwrap_err();
        assert_eq!(err.to_string(), format!("starting web-3/nginx ({program})"));
        assert!(!spec.pid_path.exists());
    }
}

#[tokio::test]
async fn signal_reaches_the_leader_for_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let script = "trap 'echo reloaded' HUP; echo ready; while :; do sleep 0.02; done";
    let spec = spec(dir.path(), "reloadable", "bash", &["-c", script]);
    let mut reloadable = spawn(&spec).await.unwrap();
    cleanup.add(reloadable.record());
    let log = || fs::read_to_string(&spec.log_path).unwrap_or_default();
    eventually("the trap to be installed", || log().contains("ready")).await;

    process::signal(&reloadable.record(), Signal::SIGHUP).unwrap();
    eventually("the reload", || log().contains("reloaded")).await;
    assert!(reloadable.record().is_alive());
    assert_eq!(reloadable.stop().await, StopOutcome::Exited);
    assert!(matches!(
        process::signal(&reloadable.record(), Signal::SIGHUP),
        Err(ProcessError::NotRunning { .. })
    ));
}

#[tokio::test]
async fn memory_is_summed_over_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let spec = spec(
        dir.path(),
        "workers",
        "bash",
        &["-c", "sleep 1000 & sleep 1000 & wait"],
    );
    let mut workers = spawn(&spec).await.unwrap();
    cleanup.add(workers.record());
    let pid = workers.pid();
    eventually("the workers to start", || group(pid).len() == 3).await;

    let memory = process::group_memory(pid).unwrap();
    assert_eq!(memory.processes, 3);
    let single = process::group_memory(group(pid)[1]).unwrap();
    assert!(
        memory.rss_bytes > single.rss_bytes,
        "{memory:?} vs {single:?}"
    );
    assert!(memory.pss_bytes.unwrap() > 0);
    assert!(process::rss_bytes(pid).is_some_and(|bytes| bytes > 0));
    assert_eq!(workers.stop().await, StopOutcome::Exited);
    assert_eq!(process::rss_bytes(pid), None);
}

/// SIGKILLs every registered process group on drop, whatever happened in the test.
#[derive(Default)]
struct Cleanup(Vec<PidRecord>);

impl Cleanup {
    fn add(&mut self, record: PidRecord) {
        self.0.push(record);
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for record in &self.0 {
            kill_now(record);
        }
    }
}

fn spec(dir: &Path, name: &str, program: &str, args: &[&str]) -> ProcessSpec {
    ProcessSpec {
        name: name.to_string(),
        program: program.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        env: BTreeMap::new(),
        cwd: None,
        user: None,
        log_path: dir.join("log").join(name).with_extension("log"),
        pid_path: dir.join("run").join(name).with_extension("pid"),
        stop_signal: Signal::SIGTERM,
        stop_timeout: Duration::from_secs(5),
    }
}

struct Stat {
    pgrp: i32,
    start_time: u64,
    zombie: bool,
}

fn stat(pid: i32) -> Stat {
    try_stat(pid).unwrap_or_else(|| panic!("no process {pid}"))
}

fn try_stat(pid: i32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = text[text.rfind(')')? + 2..].split(' ').collect();
    Some(Stat {
        zombie: fields[0] == "Z",
        pgrp: fields[2].parse().ok()?,
        start_time: fields[19].parse().ok()?,
    })
}

/// Live (non-zombie) processes whose process group is `pgrp`, sorted by pid.
fn group(pgrp: i32) -> Vec<i32> {
    let mut pids: Vec<i32> = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid| try_stat(*pid).is_some_and(|s| s.pgrp == pgrp && !s.zombie))
        .collect();
    pids.sort();
    pids
}

fn find_files(dir: &Path, found: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).unwrap().flatten() {
        if entry.file_type().unwrap().is_dir() {
            find_files(&entry.path(), found);
        } else {
            found.push(entry.path());
        }
    }
}

/// Polls `condition` every 10 ms; panics after 5 s.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
