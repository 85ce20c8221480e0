//! A real PgBouncer on 127.89.x paused through `rigger_local::pgbouncer`: a pause whose
//! pauser is killed ends by itself at its deadline, and a pause resumed in time leaves no
//! helper behind.
//!
//! Whether a pool is paused is seen the way the app would see it: a client's query through
//! PgBouncer waits, and PgBouncer opens no connection to its database (a listener of the test)
//! until the pool resumes. Needs root and pgbouncer (`scripts/install-packages.sh`); PgBouncer
//! refuses to run as root, so it runs as `postgres`.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rigger_local::pgbouncer::{AdminConsole, HelperFiles, ResumeDeadline, Resumed};
use rigger_local::process::{self, PidRecord, ProcessSpec, Supervised, kill_now};

const ADMIN_PASSWORD: &str = "admin-secret";
const APP_PASSWORD: &str = "app-secret";
/// How the pauser child learns what to pause (the password comes in its environment).
const PAUSER_VARIABLE: &str = "RIGGER_TEST_PAUSER";

/// A PgBouncer in front of a "database" that is only a listener: a connection to it means
/// PgBouncer is serving queries again.
struct Bouncer {
    dir: tempfile::TempDir,
    console: AdminConsole,
    address: Ipv4Addr,
    database: TcpListener,
    process: Option<Supervised>,
}

impl Bouncer {
    async fn start(block: u8) -> Bouncer {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test runs PgBouncer as postgres: run it as root"
        );
        let address = Ipv4Addr::new(127, 89, block, 1);
        let database = TcpListener::bind((Ipv4Addr::new(127, 89, block, 2), 0)).unwrap();
        let database_port = database.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let users = dir.path().join("userlist.txt");
        std::fs::write(
            &users,
            format!(
                "\"{}\" \"{ADMIN_PASSWORD}\"\n\"app\" \"{APP_PASSWORD}\"\n",
                rigger_recipes::PGBOUNCER_ADMIN_USER
            ),
        )
        .unwrap();
        let postgres = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("the postgres user (scripts/install-packages.sh)");
        nix::unistd::chown(&users, Some(postgres.uid), None).unwrap();
        std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o600)).unwrap();
        let ini = dir.path().join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\napp = host=127.89.{block}.2 port={database_port} dbname=app\n\n\
                 [pgbouncer]\nlisten_addr = {address}\nlisten_port = 6432\n\
                 unix_socket_dir =\nauth_type = plain\nauth_file = {users}\n\
                 admin_users = {admin}\npool_mode = transaction\n",
                users = users.display(),
                admin = rigger_recipes::PGBOUNCER_ADMIN_USER,
            ),
        )
        .unwrap();
        std::fs::set_permissions(&ini, std::fs::Permissions::from_mode(0o644)).unwrap();
        let spec = ProcessSpec {
            name: "web-1/pgbouncer".into(),
            program: "pgbouncer".into(),
            args: vec![ini.display().to_string()],
            env: BTreeMap::from([("HOME".to_owned(), "/tmp".to_owned())]),
            cwd: None,
            user: Some("postgres".into()),
            log_path: dir.path().join("pgbouncer.log"),
            pid_path: dir.path().join("run/pgbouncer.pid"),
            stop_signal: Signal::SIGINT,
            stop_timeout: Duration::from_secs(5),
        };
        let process = process::spawn(&spec).await.unwrap();
        let console = AdminConsole::new(
            address.to_string(),
            6432,
            rigger_recipes::PGBOUNCER_ADMIN_USER,
            ADMIN_PASSWORD,
        );
        let mut bouncer = Bouncer {
            dir,
            console,
            address,
            database,
            process: Some(process),
        };
        bouncer.wait_ready().await;
        bouncer
    }

    async fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            match self
                .console
                .run("SHOW VERSION", Duration::from_secs(5))
                .await
            {
                Ok(_) => return,
                Err(error) if started.elapsed() > Duration::from_secs(10) => {
                    let log =
                        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap();
                    panic!("PgBouncer did not answer: {error:#}\n{log}");
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// A client's `SELECT 1` through PgBouncer, left running: it waits while the pool is
    /// paused.
    fn client(&self) -> ChildGuard {
        ChildGuard(
            Command::new("psql")
                .arg(format!(
                    "host={} port=6432 dbname=app user=app sslmode=disable",
                    self.address
                ))
                .args(["-XAtq", "-c", "SELECT 1"])
                .env_clear()
                .env("PATH", process::DEFAULT_PATH)
                .env("PGPASSWORD", APP_PASSWORD)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    /// Waits up to `timeout` for PgBouncer to connect to its database (it serves queries
    /// again); returns when it did.
    fn database_connected(&self, timeout: Duration) -> Option<Instant> {
        self.database.set_nonblocking(true).unwrap();
        let started = Instant::now();
        while started.elapsed() < timeout {
            match self.database.accept() {
                Ok(_) => return Some(Instant::now()),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(error) => panic!("accepting: {error}"),
            }
        }
        None
    }

    fn helper_files(&self) -> HelperFiles {
        HelperFiles {
            pid: self.dir.path().join("pids/pgbouncer-resume.pid"),
            log: self.dir.path().join("log/pgbouncer-resume.log"),
        }
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        if let Some(process) = &self.process {
            kill_now(&process.record());
        }
        if let Some(record) = PidRecord::read(&self.helper_files().pid) {
            kill_now(&record);
        }
    }
}

/// Kills its child when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_ends_at_its_deadline_when_the_pauser_is_killed() {
    let bouncer = Bouncer::start(1).await;
    let deadline = Duration::from_secs(3);
    let files = bouncer.helper_files();
    // The pauser: this test binary again, running `pauser` (below), so that it can be killed
    // as the supervisor would be.
    let mut pauser = ChildGuard(
        Command::new(std::env::current_exe().unwrap())
            .args(["pauser", "--exact", "--ignored", "--nocapture"])
            .env(
                PAUSER_VARIABLE,
                format!(
                    "{} {} {} {}",
                    bouncer.address,
                    deadline.as_millis(),
                    files.pid.display(),
                    files.log.display()
                ),
            )
            .env("RIGGER_TEST_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = BufReader::new(pauser.0.stdout.take().unwrap());
    let mut paused_at = None;
    for line in stdout.lines() {
        if line.unwrap() == "paused" {
            paused_at = Some(Instant::now());
            break;
        }
    }
    let paused_at = paused_at.expect("the pauser paused PgBouncer");
    // The supervisor dies between PAUSE and RESUME.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pauser.0.id() as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    pauser.0.wait().unwrap();
    let helper = PidRecord::read(&files.pid).expect("the deadline's pid file");
    assert!(helper.is_alive(), "the deadline died with its pauser");

    let _client = bouncer.client();
    let resumed = bouncer
        .database_connected(deadline + Duration::from_secs(10))
        .expect("the pool never resumed after its pauser was killed");
    let waited = resumed - paused_at;
    assert!(
        waited >= deadline - Duration::from_millis(300),
        "the pool resumed after {waited:?}, before its {deadline:?} deadline"
    );
    assert_eq!(
        bouncer
            .console
            .resume(Duration::from_secs(5))
            .await
            .unwrap(),
        Resumed::Already
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_resumed_in_time_disarms_its_deadline() {
    let bouncer = Bouncer::start(2).await;
    let files = bouncer.helper_files();
    let deadline = ResumeDeadline::arm(
        "web-1/pgbouncer-resume",
        &bouncer.console,
        Duration::from_secs(60),
        &files,
    )
    .await
    .unwrap();
    let helper = deadline.record();
    bouncer
        .console
        .run("PAUSE", Duration::from_secs(5))
        .await
        .unwrap();
    let _client = bouncer.client();
    assert!(deadline.remaining() > Duration::from_secs(50));
    assert_eq!(
        bouncer
            .console
            .resume(Duration::from_secs(5))
            .await
            .unwrap(),
        Resumed::Now
    );
    assert!(
        bouncer
            .database_connected(Duration::from_secs(10))
            .is_some(),
        "the pool did not resume"
    );
    // The admin password is in the helper's environment, never on its command line.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", helper.pid)).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(ADMIN_PASSWORD));
    deadline.disarm().await;
    assert!(
        !helper.is_alive(),
        "the deadline's helper outlived its disarming"
    );
    assert!(
        !files.pid.exists(),
        "the deadline's pid file was left behind"
    );
}

/// Not a test: the pauser process of `a_pause_ends_at_its_deadline_when_the_pauser_is_killed`
/// (arms the deadline, pauses, says so, then waits to be killed).
#[tokio::test]
#[ignore = "run by a_pause_ends_at_its_deadline_when_the_pauser_is_killed"]
async fn pauser() {
    let config = std::env::var(PAUSER_VARIABLE).expect("run by another test");
    let words: Vec<&str> = config.split(' ').collect();
    let [address, millis, pid, log] = words[..] else {
        panic!("{PAUSER_VARIABLE}: {config}")
    };
    let console = AdminConsole::new(
        address,
        6432,
        rigger_recipes::PGBOUNCER_ADMIN_USER,
        std::env::var("RIGGER_TEST_ADMIN_PASSWORD").unwrap(),
    );
    let files = HelperFiles {
        pid: PathBuf::from(pid),
        log: PathBuf::from(log),
    };
    let after = Duration::from_millis(millis.parse().unwrap());
    let deadline = ResumeDeadline::arm("web-1/pgbouncer-resume", &console, after, &files)
        .await
        .unwrap();
    console.run("PAUSE", Duration::from_secs(5)).await.unwrap();
    println!("paused");
    std::mem::forget(deadline);
    std::future::pending::<()>().await;
}
