//! Running the `rigger` binary against moto's server for an AWS environment `prod`, as the
//! command-line tests of the AWS provider do (each uses part of this).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// `rigger ARGS -e prod --endpoint-url URL` in `dir` (its rigger.toml), with state under
/// `dir/state`, the emulator's fake credentials, no SDK retries, and stdin never a terminal
/// (confirmations are refused rather than waited for).
pub fn rigger(dir: &Path, url: &str, args: &[&str]) -> Command {
    let mut command = crate::hermetic::rigger_binary();
    command
        .args(args)
        .args(["-e", "prod", "--endpoint-url", url])
        .current_dir(dir)
        .stdin(Stdio::null())
        .env("RIGGER_STATE_DIR", dir.join("state"))
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_MAX_ATTEMPTS", "1")
        .env_remove("AWS_PROFILE")
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1");
    command
}

/// Standard output then standard error, for messages and assertions.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `rigger ARGS`, which must succeed.
pub fn ok(dir: &Path, url: &str, args: &[&str]) -> Output {
    let output = rigger(dir, url, args).output().unwrap();
    assert!(
        output.status.success(),
        "rigger {args:?}: {}",
        text(&output)
    );
    output
}

/// Runs `rigger ARGS`, which must succeed and print JSON.
pub fn json(dir: &Path, url: &str, args: &[&str]) -> serde_json::Value {
    let output = ok(dir, url, args);
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("rigger {args:?} printed no JSON ({e}): {}", text(&output)))
}

/// `git ARGS` in `dir`, as a test user.
pub fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args(["-c", "user.name=Test", "-c", "user.email=test@example.com"])
        .args(args)
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?}");
}

/// A Django app's minimum (`manage.py`, an empty `requirements.txt`) committed in a git
/// repository at `app`: what `up` builds the first release from.
pub fn committed_app(app: &Path) {
    std::fs::create_dir_all(app).unwrap();
    std::fs::write(app.join("manage.py"), "print('v1')\n").unwrap();
    std::fs::write(app.join("requirements.txt"), "").unwrap();
    git(app, &["init", "-q"]);
    git(app, &["add", "manage.py", "requirements.txt"]);
    git(app, &["commit", "-qm", "v1"]);
}
