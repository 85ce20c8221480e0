//! Readiness probes against real listeners, files, commands and a TLS server on 127.88.x.

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::geteuid;
use rigger_local::probe::{Probe, ProbeError, check, wait_ready};
use rigger_local::process::{PidRecord, ProcessSpec, kill_now, spawn};
use tokio::time::Instant;

#[tokio::test]
async fn a_tcp_probe_waits_for_a_listener_that_opens_later() {
    let addr = loopback(1);
    let port = free_port(addr);
    let listener = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let listener = tokio::net::TcpListener::bind((addr, port)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(listener);
    });

    let probe = Probe::Tcp { addr, port };
    let took = wait_ready(&probe, Duration::from_secs(5), || true, None)
        .await
        .unwrap();
    listener.abort();
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test]
async fn a_port_that_never_opens_times_out_with_the_last_reason() {
    let addr = loopback(2);
    let port = free_port(addr);
    let probe = Probe::Tcp { addr, port };

    let started = Instant::now();
    let err = wait_ready(&probe, Duration::from_millis(400), || true, None)
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(2),
        "{took:?}"
    );
    let ProbeError::TimedOut { last, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(last.contains("refused"), "{last}");
    assert_eq!(
        err.to_string(),
        format!(
            "tcp {addr}:{port} was not ready after 400 ms: \
             connecting to {addr}:{port}: Connection refused (os error 111)"
        )
    );
}

#[tokio::test]
async fn a_service_that_dies_ends_the_wait_early_with_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let script =
        "echo 'loading config'; echo 'FATAL: could not bind socket' >&2; sleep 0.2; exit 3";
    let spec = spec(dir.path(), "db-primary/postgres", "bash", &["-c", script]);
    let service = spawn(&spec).await.unwrap();
    let record = service.record();
    cleanup.add(record.clone());
    let addr = loopback(3);
    let probe = Probe::Tcp {
        addr,
        port: free_port(addr),
    };

    let started = Instant::now();
    let err = wait_ready(
        &probe,
        Duration::from_secs(30),
        || record.is_alive(),
        Some(&spec.log_path),
    )
    .await
    .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    let ProbeError::Died { log_tail, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(
        log_tail,
        &["loading config", "FATAL: could not bind socket"]
    );
    let message = err.to_string();
    assert!(
        message.starts_with("the service exited after "),
        "{message}"
    );
    assert!(
        message.ends_with(&format!(
            "while waiting for {probe}; last lines of {}:\n    loading config\n    \
             FATAL: could not bind socket",
            spec.log_path.display()
        )),
        "{message}"
    );
}

#[tokio::test]
async fn a_command_probe_succeeds_once_the_command_does() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("ready");
    let probe = Probe::Command {
        program: "test".into(),
        args: vec!["-e".into(), flag.display().to_string()],
        env: BTreeMap::new(),
        user: None,
        cwd: None,
    };
    assert_eq!(check(&probe).await, Err("test exited with 1".to_string()));

    let create = {
        let flag = flag.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            fs::write(flag, "").unwrap();
        })
    };
    let took = wait_ready(&probe, Duration::from_secs(5), || true, None)
        .await
        .unwrap();
    create.await.unwrap();
    assert!(took >= Duration::from_millis(150), "{took:?}");
}

#[tokio::test]
async fn a_command_probe_quotes_what_the_command_said() {
    let probe = Probe::Command {
        program: "bash".into(),
        args: vec![
            "-c".into(),
            "echo 'no response' >&2; echo \"$GREETING\" >&2; exit 2".into(),
        ],
        env: BTreeMap::from([("GREETING".into(), "from the probe env".into())]),
        user: None,
        cwd: None,
    };
    assert_eq!(
        check(&probe).await,
        Err("bash exited with 2: from the probe env".to_string())
    );
}

#[tokio::test]
async fn a_command_probe_runs_as_its_user() {
    if !geteuid().is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let probe = |user: Option<&str>| Probe::Command {
        program: "sh".into(),
        args: vec!["-c".into(), "test \"$(id -u)\" = 65534".into()],
        env: BTreeMap::new(),
        user: user.map(str::to_string),
        cwd: None,
    };
    assert_eq!(check(&probe(Some("nobody"))).await, Ok(()));
    assert_eq!(
        check(&probe(None)).await,
        Err("sh exited with 1".to_string())
    );
    let missing = check(&probe(Some("no-such-user-rigger")))
        .await
        .unwrap_err();
    assert!(missing.contains("does not exist"), "{missing}");
}

#[tokio::test]
async fn an_https_probe_checks_the_status_through_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-subj", "/CN=site.test", "-days", "1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let addr = loopback(4);
    let port = free_port(addr);
    let mut cleanup = Cleanup::default();
    let accept = format!("{addr}:{port}");
    let spec = spec(
        dir.path(),
        "lb/tls",
        "openssl",
        &[
            "s_server",
            "-accept",
            &accept,
            "-cert",
            &cert.display().to_string(),
            "-key",
            &key.display().to_string(),
            "-www",
            "-quiet",
        ],
    );
    let server = spawn(&spec).await.unwrap();
    let record = server.record();
    cleanup.add(record.clone());

    let probe = |expect_status| Probe::Https {
        addr,
        port,
        path: "/health/".into(),
        host: "site.test".into(),
        expect_status,
    };
    wait_ready(
        &probe(200),
        Duration::from_secs(10),
        || record.is_alive(),
        Some(&spec.log_path),
    )
    .await
    .unwrap();
    assert_eq!(
        check(&probe(204)).await,
        Err("answered HTTP 200, not 204".to_string())
    );
    assert_eq!(
        probe(204).to_string(),
        format!("https://site.test:{port}/health/ at {addr} (expecting 204)")
    );
}

#[tokio::test]
async fn an_https_probe_explains_a_refused_connection() {
    let addr = loopback(5);
    let port = free_port(addr);
    let probe = Probe::Https {
        addr,
        port,
        path: "/".into(),
        host: "site.test".into(),
        expect_status: 200,
    };
    let why = check(&probe).await.unwrap_err();
    assert!(why.starts_with("curl: ") && why.contains("onnect"), "{why}");
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

/// A loopback address of these tests' own, so parallel tests never share a port space.
fn loopback(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 88, 0, n))
}

/// A port nothing listens on at `addr` right now.
fn free_port(addr: IpAddr) -> u16 {
    TcpListener::bind((addr, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
