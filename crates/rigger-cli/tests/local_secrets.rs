//! End to end: no secret value anywhere it does not belong. After `up`, a deploy, a deploy
//! whose migration fails, and a failover, every secret the environment generated is searched
//! for in every file under the state directory, in everything rigger printed (stdout and
//! stderr of every command, errors included). A secret may only be in a file that is private
//! to its owner (at most readable by the owner's group, e.g. the app's settings, root's file
//! that the app user's group reads) and is not a log or a record of rigger's
//! (`*.log`, `*.json`, `*.jsonl`); no log or record can be read by another local user (the
//! environment's root is 0711: service users traverse it to their server's directory and can
//! list nothing; rigger's own files in it are 0600, its own directories 0700); and no running
//! process of the environment has a secret on its command line (which every local user can
//! read).
//! Needs root and the packages of scripts/install-packages.sh, like local_stack.rs.

mod common;
mod hermetic;

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{AppSource, Site};

const HTTPS_PORT: u16 = 21443;
const HTTP_PORT: u16 = 21080;

/// Every secret value of the environment (one file per secret, `secrets/<name>`).
fn secret_values(env_dir: &Path) -> Vec<(String, String)> {
    let mut values = Vec::new();
    for entry in std::fs::read_dir(env_dir.join("secrets")).unwrap() {
        let entry = entry.unwrap();
        let value = std::fs::read_to_string(entry.path()).unwrap();
        let value = value.trim().to_owned();
        assert!(
            value.len() >= 16,
            "{:?} is too short to be a secret",
            entry.path()
        );
        values.push((entry.file_name().to_string_lossy().into_owned(), value));
    }
    assert!(values.len() >= 4, "secrets found: {values:?}");
    values
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(metadata) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if metadata.is_dir() {
            out.push(path.clone());
            files_under(&path, out);
        } else if metadata.is_file() {
            out.push(path);
        }
    }
}

/// Can a local user who is neither the owner nor in the group read `path`? Every directory
/// from the environment's root down must let others through (x), and the file let them read.
fn readable_by_others(path: &Path, env_dir: &Path) -> bool {
    let mode = |p: &Path| std::fs::metadata(p).unwrap().mode();
    if mode(path) & 0o004 == 0 {
        return false;
    }
    let mut dir = path.parent();
    while let Some(current) = dir {
        if mode(current) & 0o001 == 0 {
            return false;
        }
        if current == env_dir {
            return true;
        }
        dir = current.parent();
    }
    true
}

fn is_record_or_log(path: &Path) -> bool {
    let name = path.file_name().unwrap().to_string_lossy();
    name.ends_with(".log") || name.ends_with(".json") || name.ends_with(".jsonl")
}

/// The problems found: a secret where it must not be, a log or record readable by others.
fn scan(env_dir: &Path, outputs: &[(String, Output)]) -> Vec<String> {
    let secrets = secret_values(env_dir);
    let mut problems = Vec::new();
    for (command, output) in outputs {
        for (stream, bytes) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
            let text = String::from_utf8_lossy(bytes);
            for (name, value) in &secrets {
                if text.contains(value.as_str()) {
                    problems.push(format!("`rigger {command}` printed {name} on {stream}"));
                }
            }
        }
    }
    let root_mode = std::fs::metadata(env_dir).unwrap().mode() & 0o7777;
    if root_mode & 0o066 != 0 {
        problems.push(format!(
            "the state directory {} is {root_mode:04o}",
            env_dir.display()
        ));
    }
    let mut paths = Vec::new();
    files_under(env_dir, &mut paths);
    for path in paths {
        let metadata = std::fs::symlink_metadata(&path).unwrap();
        let mode = metadata.mode() & 0o7777;
        if metadata.is_dir() {
            continue;
        }
        // Release code (and its release.json) is the app's, public to service users by design.
        let in_release = path.strip_prefix(env_dir.join("releases")).is_ok();
        if is_record_or_log(&path) && !in_release && readable_by_others(&path, env_dir) {
            problems.push(format!(
                "{} (mode {mode:04o}) can be read by any local user",
                path.display()
            ));
        }
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes);
        for (name, value) in &secrets {
            if !text.contains(value.as_str()) {
                continue;
            }
            if is_record_or_log(&path) {
                problems.push(format!("{} (a log or record) holds {name}", path.display()));
            } else if mode & 0o027 != 0 {
                problems.push(format!(
                    "{} holds {name} and is mode {mode:04o}",
                    path.display()
                ));
            }
        }
    }
    problems
}

/// Every running process whose command line carries a secret (any local user can read every
/// process's command line in /proc), as `pid (program): secret name`.
fn secrets_on_command_lines(env_dir: &Path) -> Vec<String> {
    let secrets = secret_values(env_dir);
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        for (name, value) in &secrets {
            if text.contains(value.as_str()) {
                let program = text.split(' ').next().unwrap_or("?").to_owned();
                found.push(format!(
                    "pid {} ({program}): {name}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    found
}

#[test]
#[ignore = "end to end: scripts/test runs it after the other tests (-- --ignored)"]
fn no_secret_in_any_file_log_output_or_error() {
    let project = Site::new("secrets", 84, HTTP_PORT, HTTPS_PORT, AppSource::GitCopy);
    let mut outputs: Vec<(String, Output)> = Vec::new();
    let mut run = |args: &[&str]| {
        let output = project.rigger(args);
        let success = output.status.success();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        outputs.push((args.join(" "), output));
        (success, stderr)
    };
    assert!(run(&["up"]).0, "rigger up failed");
    assert!(run(&["status"]).0);
    assert!(run(&["secrets", "list"]).0);

    project.commit_change("polls/views.py", "", "# a new release\n", "a new release");
    assert!(run(&["deploy"]).0, "the deploy failed");

    // A release whose migration fails: the deploy fails, and its error (in the terminal, the
    // history, the outcome, status.json and the supervisor's log) quotes the failure.
    let migration = project.dir.join("app/polls/migrations/0002_broken.py");
    std::fs::write(
        &migration,
        "from django.db import migrations\n\n\
         def fail(apps, schema_editor):\n    raise RuntimeError('this migration is broken')\n\n\
         class Migration(migrations.Migration):\n    dependencies = [('polls', '0001_initial')]\n    \
         operations = [migrations.RunPython(fail)]\n",
    )
    .unwrap();
    project.git(&["add", "-A"]);
    project.commit("a broken migration");
    let (deployed, said) = run(&["deploy"]);
    assert!(!deployed, "a deploy whose migration fails must fail");
    assert!(said.contains("this migration is broken"), "{said}");

    assert!(run(&["db", "promote"]).0, "the failover failed");
    assert!(run(&["db", "status"]).0);
    assert!(run(&["releases", "--json"]).0);
    assert!(run(&["status", "--json"]).0);

    let mut problems = scan(&project.env_dir(), &outputs);
    // Every service of the environment runs now: none was handed a secret on its command line.
    problems.extend(secrets_on_command_lines(&project.env_dir()));
    assert!(
        problems.is_empty(),
        "secrets or open modes:\n{}",
        problems.join("\n")
    );
}
