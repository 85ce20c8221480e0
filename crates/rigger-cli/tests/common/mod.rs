//! What the end-to-end tests share: a copy of the example site in its own address block and
//! state directory, the real `rigger` binary run in it, HTTPS requests with curl, and waiting
//! for a condition. Each test binary uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The example site, configured for one test: its own project name, address block
/// (`127.<block>.0.0/16`) and ports, state under /var/tmp (service users must traverse every
/// parent, which rules out /root). Taken down and purged on drop, whatever happened.
pub struct Site {
    pub dir: PathBuf,
    pub state: PathBuf,
    pub project: String,
    pub block: u8,
    pub https_port: u16,
    pub http_port: u16,
}

/// How the site's app gets into the project directory.
pub enum AppSource {
    /// A symlink to examples/site/app (the release copies it).
    Link,
    /// A copy in a git repository of its own, so the test can commit changes.
    GitCopy,
}

impl Site {
    pub fn new(project: &str, block: u8, http_port: u16, https_port: u16, app: AppSource) -> Site {
        assert!(
            is_root(),
            "this test runs PostgreSQL, nginx and friends as their service users: run it as root (scripts/test)"
        );
        let root =
            std::fs::canonicalize(Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")).unwrap();
        let base = PathBuf::from("/var/tmp/rigger-e2e");
        let dir = base.join(format!("{project}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let app_source = root.join("examples/site/app");
        match app {
            AppSource::Link => std::os::unix::fs::symlink(&app_source, dir.join("app")).unwrap(),
            AppSource::GitCopy => {
                let copied = Command::new("cp")
                    .arg("-R")
                    .arg(&app_source)
                    .arg(&dir)
                    .status()
                    .unwrap();
                assert!(copied.success());
            }
        }
        let config = std::fs::read_to_string(root.join("examples/site/rigger.toml"))
            .unwrap()
            .replace("127.77.0.0/16", &format!("127.{block}.0.0/16"))
            .replace("http_port = 8080", &format!("http_port = {http_port}"))
            .replace("https_port = 8443", &format!("https_port = {https_port}"))
            .replace("name = \"surveys\"", &format!("name = \"{project}\""));
        std::fs::write(dir.join("rigger.toml"), config).unwrap();
        let site = Site {
            dir,
            state: base.join("state"),
            project: project.to_owned(),
            block,
            https_port,
            http_port,
        };
        if matches!(app, AppSource::GitCopy) {
            site.git(&["init", "-q", "-b", "main"]);
            site.git(&["add", "-A"]);
            site.commit("the example site");
        }
        site
    }

    /// The environment's state directory.
    pub fn env_dir(&self) -> PathBuf {
        self.state.join(&self.project).join("local")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = crate::hermetic::rigger_binary();
        command
            .args(args)
            .current_dir(&self.dir)
            .env("RIGGER_STATE_DIR", &self.state)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG");
        command
    }

    /// Runs rigger and echoes what it said (shown when a test fails).
    pub fn rigger(&self, args: &[&str]) -> Output {
        let output = self.command(args).output().expect("rigger runs");
        eprintln!(
            "$ rigger {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.{}.0.1:{}{path}", self.block, self.https_port)
    }

    pub fn git(&self, args: &[&str]) -> String {
        let output = Command::new("git")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    pub fn commit(&self, message: &str) {
        self.git(&[
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@example.com",
            "commit",
            "-qam",
            message,
        ]);
    }

    /// Rewrites a file of the app and commits it; returns the new short revision.
    pub fn commit_change(&self, file: &str, from: &str, to: &str, message: &str) -> String {
        let path = self.dir.join("app").join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} has no {from:?}");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
        self.commit(message);
        self.git(&["rev-parse", "--short=12", "HEAD"])
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.rigger(&["down", "--purge", "--yes"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// curl with the given arguments: (HTTP status, body). Certificates are not checked (the
/// site's is signed by the environment's own CA).
pub fn curl(args: &[&str]) -> (u16, String) {
    let output = Command::new("curl")
        .args([
            "-sk",
            "--noproxy",
            "*",
            "--max-time",
            "30",
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Steady HTTPS requests (to a health check page through the load balancer) until stopped:
/// counts, failures, and the releases the page named, in the order seen.
pub struct Load {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    releases: Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(url: &str, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let releases = Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, served, failures, releases) = (
                    stop.clone(),
                    served.clone(),
                    failures.clone(),
                    releases.clone(),
                );
                let url = url.to_owned();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let (code, body) = curl(&[&url]);
                        if code == 200 {
                            served.fetch_add(1, Ordering::SeqCst);
                            let release = body
                                .split_whitespace()
                                .nth(2)
                                .unwrap_or_default()
                                .to_owned();
                            let mut seen = releases.lock().unwrap();
                            if seen.last() != Some(&release) {
                                seen.push(release);
                            }
                        } else {
                            failures.lock().unwrap().push(format!("{code}: {body}"));
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            served,
            failures,
            releases,
            threads,
        }
    }

    /// How many requests were served so far.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    /// Stops the load; returns (served, failures, releases seen in order).
    pub fn finish(self) -> (usize, Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            thread.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        let releases = self.releases.lock().unwrap().clone();
        (self.served.load(Ordering::SeqCst), failures, releases)
    }
}

/// Polls `check` until it gives a value, failing the test after `timeout`.
pub fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether a process runs (a zombie counts as gone).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"))
}

/// SIGKILL to `pid`, as a crash would.
pub fn kill_hard(pid: i64) {
    let kill = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
}

pub fn status_json(project: &Site) -> serde_json::Value {
    let output = project.command(&["status", "--json"]).output().unwrap();
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The running `process` of the first server `matches` picks: (server, process, pid), or
/// `None` when it does not run.
pub fn process_of(
    status: &serde_json::Value,
    matches: impl Fn(&serde_json::Value) -> bool,
    process: &str,
) -> Option<(String, String, i64)> {
    let server = status["servers"].as_array()?.iter().find(|s| matches(s))?;
    let found = server["processes"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == process && p["state"] == "running")?;
    Some((
        server["id"].as_str()?.to_owned(),
        process.to_owned(),
        found["pid"].as_i64()?,
    ))
}
