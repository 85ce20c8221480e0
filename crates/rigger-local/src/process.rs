//! Running service processes safely: start, record, signal, stop, and clean up after a crash.
//!
//! [`spawn`] starts a [`ProcessSpec`] as the leader of its own process group (so Ctrl-C on
//! rigger's terminal does not reach it, and stopping it reaches every worker it forked), with
//! exactly the environment it was given, as the user it names, its output appended to its log.
//! It then writes a pid file holding a [`PidRecord`]: the pid *and* the kernel's start time of
//! that process, plus the boot it belongs to. Every later operation ([`stop`], [`signal()`],
//! [`PidRecord::is_alive`]) first checks that the pid still names that very process, so a pid
//! the kernel has handed to someone else is never signalled. Because the record is on disk, a
//! rigger started after the supervisor was killed can still stop everything:
//! [`stop_leftovers`] walks a state directory and stops whatever its pid files name.
//!
//! Root signals what a pid file names, so a pid file is trusted only where nobody but root
//! (rigger's user) can write: it is written into a directory of mode 0700 whose every parent
//! only root can write ([`crate::safe_fs::check_private`]), it must belong to rigger's user,
//! and [`stop_leftovers`] never descends into a directory a service user could write (Celery's
//! and RabbitMQ's own pid files live in such directories; a record planted there is ignored).
//!
//! Stopping is polled (every 20 ms), never a fixed sleep: [`stop`] sends the stop signal to the
//! group, waits until the leader and every member are gone, and SIGKILLs the group when the
//! timeout passes. A leader that already died while members of its group live on (a shell that
//! backgrounded a job) still has those members stopped.
//!
//! Everything reads Linux's `/proc`; this module is Linux-only, as is the local provider.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::str::FromStr;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{self, Signal};
use nix::unistd::{Pid, User, geteuid};
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// The `PATH` a process gets when its spec's environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How often [`stop`] looks whether the process is gone yet.
const POLL: Duration = Duration::from_millis(20);

/// How long [`stop`] waits for SIGKILL to take effect before giving up on watching.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// One service process to run, e.g. nginx on `web-3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// Unique among all processes of an environment, e.g. `web-3/nginx`.
    pub name: String,
    /// The program; a bare name is looked up in the spec's `PATH`.
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The whole environment of the process: nothing is inherited from rigger, except that
    /// [`DEFAULT_PATH`] is added when `PATH` is absent.
    pub env: BTreeMap<String, String>,
    /// Working directory; rigger's own when `None`.
    pub cwd: Option<PathBuf>,
    /// Run as this user (and its groups) when rigger is root. When rigger is not root and the
    /// user differs, the process runs as rigger's user (logged at debug level).
    pub user: Option<String>,
    /// Standard output and standard error are appended here; the directory is created.
    pub log_path: PathBuf,
    /// Where the [`PidRecord`] is written; the directory is created.
    pub pid_path: PathBuf,
    /// The signal that asks the service to shut down (SIGTERM for most, SIGINT is "fast
    /// shutdown" for PostgreSQL, SIGQUIT graceful for nginx).
    pub stop_signal: Signal,
    /// How long the service may take to shut down before its group is SIGKILLed.
    pub stop_timeout: Duration,
}

/// A running process started by [`spawn`]; owns the child so the supervisor can wait on it.
///
/// Dropping it leaves the process running (as a supervisor crash would); stop it with
/// [`stop_supervised`] or, from any later rigger, with [`stop`] / [`stop_leftovers`].
#[derive(Debug)]
pub struct Supervised {
    child: Child,
    record: PidRecord,
    stop_timeout: Duration,
}

/// What a pid file holds: enough to find a process again and to be sure it is the same one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PidRecord {
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat`: clock ticks since boot when the process started. A pid
    /// is reused only by a process with a different start time.
    pub start_time: u64,
    /// `/proc/sys/kernel/random/boot_id` when the process started, so a record left from before
    /// a reboot never matches. Empty when unknown (older record), then not compared.
    #[serde(default)]
    pub boot_id: String,
    pub name: String,
    pub program: String,
    /// The signal [`stop_leftovers`] sends; SIGTERM when absent.
    #[serde(with = "signal_name", default = "default_stop_signal")]
    pub stop_signal: Signal,
    /// What the process was started from (its command, environment and configuration, as
    /// the supervisor digests them): a later supervisor adopts a process still running only
    /// when it would start exactly this. Empty: unknown, never adopted.
    #[serde(default)]
    pub config_digest: String,
    /// The pid file this record was read from or written to; removed by [`stop`].
    #[serde(skip)]
    pub pid_path: Option<PathBuf>,
}

/// How a [`stop`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopOutcome {
    /// The process (and its group) exited within the timeout after the stop signal.
    Exited,
    /// The timeout passed; the group was SIGKILLed.
    Killed,
    /// Nothing of the recorded process was running; nothing was signalled.
    NotRunning,
}

/// The memory of a process, its process group and its descendants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GroupMemory {
    /// How many processes were counted.
    pub processes: usize,
    /// Sum of resident set sizes; counts pages shared between processes (preforked workers)
    /// once per process, so it overstates the total.
    pub rss_bytes: u64,
    /// Sum of proportional set sizes (shared pages split between their users): the fair
    /// figure for "how much memory does this stack use". `None` when a process's
    /// `smaps_rollup` was unreadable.
    pub pss_bytes: Option<u64>,
}

/// A failed process operation, naming the operation and the process; the cause is the source.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("creating directory {} for {name}", path.display())]
    CreateDir {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("opening log {} for {name}", path.display())]
    OpenLog {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("looking up user {user} for {name}")]
    LookupUser {
        name: String,
        user: String,
        #[source]
        source: Errno,
    },
    #[error("user {user} for {name} does not exist; create it (e.g. `useradd --system {user}`)")]
    NoSuchUser { name: String, user: String },
    #[error("starting {name} ({})", program.display())]
    Start {
        name: String,
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the start time of {name} (pid {pid}) from /proc")]
    StartTime {
        name: String,
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("writing pid file {} for {name}", path.display())]
    WritePidFile {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("waiting for {name} (pid {pid})")]
    Wait {
        name: String,
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("sending {signal} to {name} (pid {pid})")]
    Signal {
        name: String,
        pid: i32,
        signal: Signal,
        #[source]
        source: Errno,
    },
    #[error("{name} (pid {pid}) is not running")]
    NotRunning { name: String, pid: i32 },
}

/// Starts `spec` in its own process group and writes its pid file.
///
/// Returns once the program has been executed (a missing program is an error here, not a
/// silent exit later). If the pid file cannot be written the process is killed again, so no
/// unrecorded process is left behind.
pub async fn spawn(spec: &ProcessSpec) -> Result<Supervised, ProcessError> {
    let name = &spec.name;
    let (stdout, stderr) = open_log(name, &spec.log_path)?;
    let pid_dir = spec.pid_path.parent().unwrap_or(Path::new("."));
    create_pid_dir(pid_dir).map_err(|source| ProcessError::CreateDir {
        name: name.clone(),
        path: pid_dir.to_path_buf(),
        source,
    })?;
    let mut command = command(
        name,
        &spec.program,
        &spec.args,
        &spec.env,
        spec.user.as_deref(),
    )?;
    if let Some(cwd) = &spec.cwd {
        command.current_dir(cwd);
    }
    command
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(false);
    let child = command.spawn().map_err(|source| ProcessError::Start {
        name: name.clone(),
        program: spec.program.clone(),
        source,
    })?;
    let pid = child.id().map_or(0, |id| id as i32);
    let mut supervised = Supervised {
        child,
        record: PidRecord {
            pid,
            start_time: 0,
            boot_id: boot_id(),
            name: name.clone(),
            program: spec.program.display().to_string(),
            stop_signal: spec.stop_signal,
            config_digest: String::new(),
            pid_path: Some(spec.pid_path.clone()),
        },
        stop_timeout: spec.stop_timeout,
    };
    // The child cannot have been reaped yet (only `wait` reaps it), so its /proc entry exists
    // even if it already exited.
    let recorded = read_stat(pid)
        .map_err(|source| ProcessError::StartTime {
            name: name.clone(),
            pid,
            source,
        })
        .and_then(|stat| {
            supervised.record.start_time = stat.start_time;
            supervised.record.write(&spec.pid_path)
        });
    if let Err(err) = recorded {
        let _ = signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = supervised.child.wait().await;
        return Err(err);
    }
    tracing::debug!(name = %name, pid, program = %spec.program.display(), "started");
    Ok(supervised)
}

/// Stops the recorded process and its group, then removes its pid file.
///
/// Sends `signal` to the group (and the leader), polls every 20 ms until the leader is gone (a
/// zombie counts as gone) and no member of its group remains, and SIGKILLs the group once
/// `timeout` has passed. Nothing is signalled when the pid now names another process. The pid
/// file is removed only if it still holds this record (a restarted service keeps its own).
pub async fn stop(record: &PidRecord, signal: Signal, timeout: Duration) -> StopOutcome {
    let outcome = stop_group(record, signal, timeout).await;
    record.remove_pid_file();
    tracing::debug!(name = %record.name, pid = record.pid, ?outcome, "stopped");
    outcome
}

/// Stops a process this supervisor started, like [`stop`], and reaps it.
pub async fn stop_supervised(
    supervised: &mut Supervised,
    signal: Signal,
    timeout: Duration,
) -> StopOutcome {
    let outcome = stop(&supervised.record, signal, timeout).await;
    // After a stop the child is a zombie (or was killed moments ago): reaping is immediate.
    // Bounded anyway, in case SIGKILL has not landed (a process stuck in the kernel).
    if tokio::time::timeout(KILL_GRACE, supervised.child.wait())
        .await
        .is_err()
    {
        tracing::warn!(name = %supervised.record.name, pid = supervised.record.pid,
            "process did not exit after SIGKILL");
    }
    outcome
}

/// Stops every process recorded in a `*.pid` file under `dir` (recursively, through
/// directories only root can write), concurrently, each with its record's stop signal then
/// SIGKILL after `timeout`, and removes the pid files of processes that are gone. A `.pid`
/// file that is not a rigger record (a service's own) is left alone.
///
/// Used when a supervisor starts after a crash, and by `rigger down` when no supervisor is
/// alive, so no process is ever orphaned. Results are sorted by pid file path.
pub async fn stop_leftovers(dir: &Path, timeout: Duration) -> Vec<(String, StopOutcome)> {
    sort_leftovers(dir, |_| false, timeout).await.1
}

/// The processes recorded under `dir` (as [`stop_leftovers`] finds them) that still run and
/// that `keep` accepts, by name; every other one is stopped (concurrently, as
/// [`stop_leftovers`] does) and its pid file removed. How a supervisor takes over from one
/// that died: it keeps what it may adopt, and nothing else survives.
pub async fn sort_leftovers(
    dir: &Path,
    keep: impl Fn(&PidRecord) -> bool,
    timeout: Duration,
) -> (BTreeMap<String, PidRecord>, Vec<(String, StopOutcome)>) {
    let mut files = Vec::new();
    find_pid_files(dir, &mut files);
    files.sort();
    let mut kept = BTreeMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, path) in files.into_iter().enumerate() {
        // Not a record of rigger's: a service's own pid file (nginx writes one where rigger
        // keeps its server's run files), which is the service's to manage, not rigger's to
        // remove. rigger writes its records atomically, so none of its own is half-written.
        let Some(record) = PidRecord::read(&path) else {
            tracing::debug!(path = %path.display(), "not a pid record of rigger's: left alone");
            continue;
        };
        if record.is_alive() && keep(&record) {
            kept.insert(record.name.clone(), record);
            continue;
        }
        tasks.spawn(async move {
            let outcome = stop(&record, record.stop_signal, timeout).await;
            (index, record.name, outcome)
        });
    }
    let mut results = tasks.join_all().await;
    results.sort_by_key(|(index, ..)| *index);
    let stopped = results
        .into_iter()
        .map(|(_, name, outcome)| (name, outcome))
        .collect();
    (kept, stopped)
}

/// Sends `sig` to the recorded process only (not its group): reloads such as SIGHUP to nginx or
/// gunicorn are for the master, which tells its workers itself.
pub fn signal(record: &PidRecord, sig: Signal) -> Result<(), ProcessError> {
    if !record.is_alive() {
        return Err(ProcessError::NotRunning {
            name: record.name.clone(),
            pid: record.pid,
        });
    }
    signal::kill(Pid::from_raw(record.pid), sig).map_err(|source| ProcessError::Signal {
        name: record.name.clone(),
        pid: record.pid,
        signal: sig,
        source,
    })
}

/// SIGKILLs the recorded process and its group at once, without waiting; for drop guards and
/// last-resort cleanup. Has the same pid-reuse guard as [`stop`]; returns whether anything was
/// signalled.
pub fn kill_now(record: &PidRecord) -> bool {
    match targets(record) {
        Some(targets) => {
            targets.send(record, Signal::SIGKILL);
            true
        }
        None => false,
    }
}

/// Resident memory of `pid`, its process group and its descendants, in bytes; `None` when the
/// process does not exist. See [`GroupMemory`] for why PSS is usually the better figure.
pub fn rss_bytes(pid: i32) -> Option<u64> {
    group_memory(pid).map(|memory| memory.rss_bytes)
}

/// Memory of `pid`, its process group and its descendants (zombies excluded); `None` when the
/// process does not exist.
pub fn group_memory(pid: i32) -> Option<GroupMemory> {
    read_stat(pid).ok()?;
    let processes = all_processes();
    let mut members: BTreeSet<i32> = processes
        .iter()
        .filter(|(_, stat)| stat.pgrp == pid && stat.state != 'Z')
        .map(|(p, _)| *p)
        .collect();
    members.insert(pid);
    // Descendants that left the group (setsid) still belong to the service.
    loop {
        let before = members.len();
        for (p, stat) in &processes {
            if members.contains(&stat.ppid) && stat.state != 'Z' {
                members.insert(*p);
            }
        }
        if members.len() == before {
            break;
        }
    }
    let mut memory = GroupMemory {
        processes: 0,
        rss_bytes: 0,
        pss_bytes: Some(0),
    };
    for p in members {
        let Some(rss) = status_kib(&format!("/proc/{p}/status"), "VmRSS:") else {
            continue; // gone meanwhile, or a kernel thread
        };
        memory.processes += 1;
        memory.rss_bytes += rss * 1024;
        let pss = status_kib(&format!("/proc/{p}/smaps_rollup"), "Pss:");
        memory.pss_bytes = memory.pss_bytes.zip(pss).map(|(sum, kib)| sum + kib * 1024);
    }
    Some(memory)
}

/// The last `lines` lines of a log file (reading at most its last 64 KiB); empty when the file
/// cannot be read.
pub fn log_tail(path: &Path, lines: usize) -> Vec<String> {
    const WINDOW: u64 = 64 * 1024;
    let Ok(mut file) = File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(WINDOW);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut all: Vec<&str> = text.lines().collect();
    if start > 0 && !all.is_empty() {
        all.remove(0); // the window began mid-line
    }
    let skip = all.len().saturating_sub(lines);
    all[skip..].iter().map(|line| line.to_string()).collect()
}

impl Supervised {
    /// The pid of the process (the leader of its process group).
    pub fn pid(&self) -> i32 {
        self.record.pid
    }

    /// What its pid file holds.
    pub fn record(&self) -> PidRecord {
        self.record.clone()
    }

    /// Waits until the process exits and reaps it.
    pub async fn wait(&mut self) -> Result<ExitStatus, ProcessError> {
        self.child
            .wait()
            .await
            .map_err(|source| ProcessError::Wait {
                name: self.record.name.clone(),
                pid: self.record.pid,
                source,
            })
    }

    /// Returns the exit status if the process has exited (reaping it), without waiting.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        self.child.try_wait().map_err(|source| ProcessError::Wait {
            name: self.record.name.clone(),
            pid: self.record.pid,
            source,
        })
    }

    /// Stops it with the spec's stop signal and timeout; see [`stop_supervised`].
    pub async fn stop(&mut self) -> StopOutcome {
        let (signal, timeout) = (self.record.stop_signal, self.stop_timeout);
        stop_supervised(self, signal, timeout).await
    }
}

/// Waits until the recorded process exits, whoever its parent is: how a supervisor watches
/// a process it adopted from an earlier one (it cannot `wait` for another's child). Through a
/// pidfd, which names the process itself, not its pid: opened, then checked to be the
/// recorded process still, so a pid handed to another process is never watched. Returns at
/// once when the process is already gone; it is never reaped here (its parent, or init, does).
pub async fn wait_for_exit(record: &PidRecord) -> io::Result<()> {
    let Some(pid) = rustix::process::Pid::from_raw(record.pid) else {
        return Ok(());
    };
    let pidfd = match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) => return Ok(()),
        Err(error) => return Err(error.into()),
    };
    if !record.is_alive() {
        return Ok(());
    }
    // A pidfd polls readable once its process has exited. Polled on a thread of its own
    // (tokio registers a descriptor only through `unsafe`, which this workspace forbids): a
    // thread that ends with the process, or with rigger.
    let (exited, on_exit) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("watch {}", record.name))
        .spawn(move || {
            let polled = loop {
                let mut fds = [rustix::event::PollFd::new(
                    &pidfd,
                    rustix::event::PollFlags::IN,
                )];
                match rustix::event::poll(&mut fds, None) {
                    Err(rustix::io::Errno::INTR) => continue,
                    other => break other.map(drop).map_err(io::Error::from),
                }
            };
            let _ = exited.send(polled);
        })?;
    on_exit.await.unwrap_or(Ok(()))
}

impl PidRecord {
    /// Reads a pid file; `None` when it is missing, not a record, a symbolic link, or not
    /// rigger's own (root's) file.
    pub fn read(path: &Path) -> Option<PidRecord> {
        let dir = crate::safe_fs::Dir::open(path.parent()?).ok()?;
        let (bytes, metadata) = dir.read_file(path.file_name()?).ok()??;
        if !crate::safe_fs::is_trusted_owner(metadata.st_uid) {
            tracing::warn!(path = %path.display(), uid = metadata.st_uid,
                "ignoring a pid file that is not rigger's");
            return None;
        }
        let mut record: PidRecord = serde_json::from_slice(&bytes).ok()?;
        record.pid_path = Some(path.to_path_buf());
        Some(record)
    }

    /// Whether the recorded process still runs: the pid exists, is not a zombie, and started
    /// at the recorded time in this boot (so it is not a reuse of the pid).
    pub fn is_alive(&self) -> bool {
        self.leader() == Leader::Alive
    }

    /// The record of this very process (for a process that watches over others and must be
    /// found again, and never confused with a later one given its pid).
    pub fn of_this_process(name: &str) -> io::Result<PidRecord> {
        let pid = i32::try_from(std::process::id()).unwrap_or(0);
        Ok(PidRecord {
            pid,
            start_time: read_stat(pid)?.start_time,
            boot_id: boot_id(),
            name: name.to_owned(),
            program: std::env::current_exe()
                .map(|path| path.display().to_string())
                .unwrap_or_default(),
            stop_signal: Signal::SIGTERM,
            config_digest: String::new(),
            pid_path: None,
        })
    }

    /// Records what the process was started from in its pid file (see
    /// [`PidRecord::config_digest`]), if the file still describes this process.
    pub fn record_config_digest(&mut self, digest: &str) -> Result<(), ProcessError> {
        self.config_digest = digest.to_owned();
        let Some(path) = self.pid_path.clone() else {
            return Ok(());
        };
        if !PidRecord::read(&path).is_some_and(|on_disk| on_disk.same_process(self)) {
            return Err(ProcessError::NotRunning {
                name: self.name.clone(),
                pid: self.pid,
            });
        }
        self.write(&path)
    }

    /// Writes the record atomically (temporary file, then rename) so a reader never sees
    /// half, mode 0600, through a handle on its directory.
    fn write(&self, path: &Path) -> Result<(), ProcessError> {
        let error = |source| ProcessError::WritePidFile {
            name: self.name.clone(),
            path: path.to_path_buf(),
            source,
        };
        let json = serde_json::to_string(self).map_err(|e| error(e.into()))?;
        let name = path
            .file_name()
            .ok_or_else(|| error(io::Error::from(io::ErrorKind::InvalidInput)))?;
        let dir =
            crate::safe_fs::Dir::open(path.parent().unwrap_or(Path::new("."))).map_err(error)?;
        dir.write_file(name, (json + "\n").as_bytes(), 0o600, None)
            .map_err(error)
    }

    /// Removes the pid file if it still describes this process.
    fn remove_pid_file(&self) {
        let Some(path) = &self.pid_path else { return };
        if PidRecord::read(path).is_some_and(|on_disk| on_disk.same_process(self)) {
            let _ = fs::remove_file(path);
        }
    }

    fn same_process(&self, other: &PidRecord) -> bool {
        self.pid == other.pid
            && self.start_time == other.start_time
            && self.boot_id == other.boot_id
    }

    fn leader(&self) -> Leader {
        if self.pid <= 0 {
            return Leader::Gone;
        }
        if !self.boot_id.is_empty() && self.boot_id != boot_id() {
            return Leader::OtherBoot;
        }
        match read_stat(self.pid) {
            Err(_) => Leader::Gone,
            Ok(stat) if stat.start_time != self.start_time => Leader::Reused,
            Ok(stat) if matches!(stat.state, 'Z' | 'X') => Leader::Gone,
            Ok(_) => Leader::Alive,
        }
    }

    /// Live members of the process group this record's process leads. Only processes started
    /// no earlier than the leader count: a group id cannot be handed out again while any member
    /// lives, so these are the leader's own workers.
    fn live_members(&self) -> Vec<i32> {
        all_processes()
            .into_iter()
            .filter(|(_, stat)| {
                stat.pgrp == self.pid && stat.state != 'Z' && stat.start_time >= self.start_time
            })
            .map(|(pid, _)| pid)
            .collect()
    }
}

/// What the pid of a record names now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leader {
    /// The recorded process, running.
    Alive,
    /// Exited (possibly a zombie not yet reaped).
    Gone,
    /// Another process that got the same pid.
    Reused,
    /// The record is from before a reboot.
    OtherBoot,
}

/// Whom to signal for a record.
#[derive(Debug, Clone, Copy)]
struct Targets {
    leader: bool,
    group: bool,
}

impl Targets {
    fn send(self, record: &PidRecord, sig: Signal) {
        let pid = Pid::from_raw(record.pid);
        if self.group {
            let _ = signal::killpg(pid, sig);
        }
        if self.leader {
            let _ = signal::kill(pid, sig);
        }
    }
}

/// Whom to signal for `record`, or `None` when nothing of it is running.
fn targets(record: &PidRecord) -> Option<Targets> {
    match record.leader() {
        Leader::Reused | Leader::OtherBoot => None,
        // A record may name a process that is not a group leader (written by hand, or by an
        // older rigger); then signalling its group would hit rigger's own group.
        Leader::Alive => Some(Targets {
            leader: true,
            group: read_stat(record.pid).is_ok_and(|stat| stat.pgrp == record.pid),
        }),
        Leader::Gone => (!record.live_members().is_empty()).then_some(Targets {
            leader: false,
            group: true,
        }),
    }
}

fn gone(record: &PidRecord, targets: Targets) -> bool {
    !record.is_alive() && (!targets.group || record.live_members().is_empty())
}

/// Stops a service as systemd's `KillMode=mixed` does (the units rigger writes for servers):
/// the stop signal goes to the main process alone, which stops its own children its own way
/// (Celery's warm shutdown lets running tasks finish only if its pool processes are not
/// signalled too; PostgreSQL and nginx masters stop their workers in order). When the main
/// process has exited, what is left of its group gets the stop signal, then SIGKILL; after
/// `timeout`, the whole group is killed.
async fn stop_group(record: &PidRecord, sig: Signal, timeout: Duration) -> StopOutcome {
    let Some(targets) = targets(record) else {
        return StopOutcome::NotRunning;
    };
    let main_only = Targets {
        leader: targets.leader,
        group: !targets.leader && targets.group,
    };
    main_only.send(record, sig);
    // A stopped (SIGSTOP, or hung under a debugger) process never acts on its stop signal;
    // continuing it lets it shut down cleanly, as systemd does.
    targets.send(record, Signal::SIGCONT);
    let deadline = Instant::now() + timeout;
    let mut leftovers_signalled = None;
    while !gone(record, targets) {
        let now = Instant::now();
        if now >= deadline {
            tracing::debug!(name = %record.name, pid = record.pid, ?timeout, "stop timed out, killing");
            return kill_group(record, targets).await;
        }
        if targets.group && !record.is_alive() {
            match leftovers_signalled {
                None => {
                    Targets {
                        leader: false,
                        group: true,
                    }
                    .send(record, sig);
                    leftovers_signalled = Some(now);
                }
                Some(at) if now.duration_since(at) >= KILL_GRACE => {
                    kill_group(record, targets).await;
                    return StopOutcome::Exited;
                }
                Some(_) => {}
            }
        }
        tokio::time::sleep(POLL).await;
    }
    StopOutcome::Exited
}

async fn kill_group(record: &PidRecord, targets: Targets) -> StopOutcome {
    targets.send(record, Signal::SIGKILL);
    let deadline = Instant::now() + KILL_GRACE;
    while !gone(record, targets) && Instant::now() < deadline {
        tokio::time::sleep(POLL).await;
    }
    StopOutcome::Killed
}

/// coreutils' `env`, which starts every service with default signal dispositions.
const ENV_PROGRAM: &str = "/usr/bin/env";

/// Builds the command for `program` with exactly `env` (plus a default `PATH`), started with
/// every signal at its default action and wrapped in `setpriv` to become `user` when we are
/// root. Shared with the command probe.
pub(crate) fn command(
    name: &str,
    program: &Path,
    args: &[String],
    env: &BTreeMap<String, String>,
    user: Option<&str>,
) -> Result<Command, ProcessError> {
    // A missing program is reported here, not by a wrapper's exit in the log later.
    let path = env.get("PATH").map_or(DEFAULT_PATH, String::as_str);
    find_program(program, path).map_err(|source| ProcessError::Start {
        name: name.to_string(),
        program: program.to_path_buf(),
        source,
    })?;
    // Every signal back to its default action, as systemd starts services: a signal ignored
    // where rigger was started (`nohup` ignores SIGHUP) would stay ignored across exec, and a
    // shell cannot even trap it then. std resets the signal mask; `env` resets dispositions
    // (no unsafe pre_exec in this workspace).
    let mut command = Command::new(ENV_PROGRAM);
    command.arg("--default-signal");
    if let Some(user) = run_as(name, user)? {
        command
            .arg("setpriv")
            .arg(format!("--reuid={}", user.uid))
            .arg(format!("--regid={}", user.gid))
            .arg("--init-groups")
            .arg("--");
    }
    command.arg(program);
    command.args(args).env_clear().envs(env);
    if !env.contains_key("PATH") {
        command.env("PATH", DEFAULT_PATH);
    }
    Ok(command)
}

/// The user to switch to, if any: only when root and the user is not root itself.
fn run_as(name: &str, user: Option<&str>) -> Result<Option<User>, ProcessError> {
    let Some(user_name) = user else {
        return Ok(None);
    };
    let user = User::from_name(user_name)
        .map_err(|source| ProcessError::LookupUser {
            name: name.to_string(),
            user: user_name.to_string(),
            source,
        })?
        .ok_or_else(|| ProcessError::NoSuchUser {
            name: name.to_string(),
            user: user_name.to_string(),
        })?;
    let euid = geteuid();
    if user.uid == euid {
        return Ok(None);
    }
    if !euid.is_root() {
        tracing::debug!(
            name,
            user = user_name,
            "not root: running as the current user instead"
        );
        return Ok(None);
    }
    Ok(Some(user))
}

/// Where `program` would be executed from, searching `path` when it is a bare name.
fn find_program(program: &Path, path: &str) -> io::Result<PathBuf> {
    let candidates: Vec<PathBuf> = if program.components().count() > 1 {
        vec![program.to_path_buf()]
    } else {
        path.split(':')
            .map(|dir| Path::new(dir).join(program))
            .collect()
    };
    candidates
        .into_iter()
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt as _;
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
}

fn open_log(name: &str, path: &Path) -> Result<(File, File), ProcessError> {
    if let Some(dir) = path.parent() {
        create_dir(name, dir)?;
    }
    let error = |source| ProcessError::OpenLog {
        name: name.to_string(),
        path: path.to_path_buf(),
        source,
    };
    // The service writes through the descriptor; the file stays root's, readable by root only.
    let stdout = crate::files::open_private_log(path).map_err(error)?;
    let stderr = stdout.try_clone().map_err(error)?;
    Ok((stdout, stderr))
}

/// Creates the directory of pid files, mode 0700, and checks that only root (rigger's user)
/// can change what it holds, so a record read back from it is one rigger wrote.
fn create_pid_dir(dir: &Path) -> io::Result<()> {
    let handle = crate::safe_fs::Dir::create(dir)?;
    if handle.metadata()?.st_uid == geteuid().as_raw() {
        handle.set_owner_and_mode(None, 0o700)?;
    }
    crate::safe_fs::check_private(dir)
}

fn create_dir(name: &str, dir: &Path) -> Result<(), ProcessError> {
    if dir.as_os_str().is_empty() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|source| ProcessError::CreateDir {
        name: name.to_string(),
        path: dir.to_path_buf(),
        source,
    })
}

/// The live processes recorded under `dir` (e.g. left by a supervisor that was killed).
pub fn live_records(dir: &Path) -> Vec<PidRecord> {
    let mut files = Vec::new();
    find_pid_files(dir, &mut files);
    files
        .iter()
        .filter_map(|path| PidRecord::read(path))
        .filter(PidRecord::is_alive)
        .collect()
}

/// The `*.pid` files under `dir`, found through directories only root (rigger's user) can
/// write: a directory a service user could write (its own run directory, PGDATA) is not
/// entered, so a record planted there is never read.
fn find_pid_files(dir: &Path, found: &mut Vec<PathBuf>) {
    if !dir.exists() {
        return;
    }
    if let Err(err) = crate::safe_fs::check_private(dir) {
        tracing::warn!(dir = %dir.display(), "not reading pid files: {err}");
        return;
    }
    find_pid_files_below(dir, found);
}

fn find_pid_files_below(dir: &Path, found: &mut Vec<PathBuf>) {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // file_type and metadata do not follow symlinks, so a link can neither trap the walk
        // in a loop nor lead it elsewhere.
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => {
                let private = entry
                    .metadata()
                    .is_ok_and(|m| crate::safe_fs::only_trusted_can_write_mode(m.uid(), m.mode()));
                if private {
                    find_pid_files_below(&path, found);
                }
            }
            Ok(kind) if kind.is_file() && path.extension().is_some_and(|ext| ext == "pid") => {
                found.push(path);
            }
            _ => {}
        }
    }
}

/// The fields of `/proc/<pid>/stat` rigger uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    state: char,
    ppid: i32,
    pgrp: i32,
    start_time: u64,
}

/// Whether process `pid` runs: it exists and has not exited (a zombie, not yet reaped by its
/// parent, counts as gone).
pub fn is_running(pid: i32) -> bool {
    pid > 0 && read_stat(pid).is_ok_and(|stat| !matches!(stat.state, 'Z' | 'X'))
}

/// The parent of process `pid`, while it exists.
pub fn parent_of(pid: i32) -> Option<i32> {
    (pid > 0)
        .then(|| read_stat(pid).ok())
        .flatten()
        .map(|stat| stat.ppid)
}

fn read_stat(pid: i32) -> io::Result<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected /proc/{pid}/stat: {text}"),
        )
    })
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may itself
/// contain spaces and parentheses, so fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?; // field 3
    let ppid = fields.next()?.parse().ok()?; // field 4
    let pgrp = fields.next()?.parse().ok()?; // field 5
    let start_time = fields.nth(16)?.parse().ok()?; // field 22
    Some(Stat {
        state,
        ppid,
        pgrp,
        start_time,
    })
}

fn all_processes() -> Vec<(i32, Stat)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, read_stat(pid).ok()?)))
        .collect()
}

/// A `Key:   123 kB` line of a `/proc` file, in KiB.
fn status_kib(path: &str, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    let line = text.lines().find(|line| line.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_string())
        .unwrap_or_default()
}

fn default_stop_signal() -> Signal {
    Signal::SIGTERM
}

/// Signals are stored by name (`"SIGTERM"`), which is stable across architectures.
mod signal_name {
    use super::*;

    pub fn serialize<S: serde::Serializer>(signal: &Signal, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(signal.as_str())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Signal, D::Error> {
        let name = String::deserialize(d)?;
        Signal::from_str(&name).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let text = "4242 (a) (b c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 200 18446744073709551615\n";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                state: 'S',
                ppid: 1,
                pgrp: 4242,
                start_time: 987654
            })
        );
    }

    #[test]
    fn a_zombie_is_not_running_and_a_parent_is_known() {
        let me = std::process::id() as i32;
        assert!(is_running(me));
        assert_eq!(parent_of(me), Some(nix::unistd::getppid().as_raw()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        assert_eq!(parent_of(pid), Some(me));
        // Exited and not reaped yet: a zombie, which runs nothing. Its state changes when it
        // exits, so wait for that (bounded) rather than for a while.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while is_running(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            !is_running(pid),
            "an exited, unreaped child counts as running"
        );
        assert_eq!(parent_of(pid), Some(me), "a zombie still has its parent");
        child.wait().unwrap();
        assert!(!is_running(pid));
        assert!(!is_running(0) && !is_running(-1));
    }

    #[test]
    fn record_json_has_the_documented_fields() {
        let record = PidRecord {
            pid: 7,
            start_time: 99,
            boot_id: "b".into(),
            name: "web-3/nginx".into(),
            program: "/usr/sbin/nginx".into(),
            stop_signal: Signal::SIGQUIT,
            config_digest: "d".into(),
            pid_path: Some("/x.pid".into()),
        };
        let json = serde_json::to_string(&record).unwrap();
        assert_eq!(
            json,
            r#"{"pid":7,"start_time":99,"boot_id":"b","name":"web-3/nginx","program":"/usr/sbin/nginx","stop_signal":"SIGQUIT","config_digest":"d"}"#
        );
        let minimal: PidRecord =
            serde_json::from_str(r#"{"pid":7,"start_time":99,"name":"n","program":"p"}"#).unwrap();
        assert_eq!(minimal.stop_signal, Signal::SIGTERM);
        assert_eq!(minimal.boot_id, "");
    }
}
