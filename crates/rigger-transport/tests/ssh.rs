//! The SSH transport against real sshd servers on their own loopback addresses (see
//! `support`): fan-out, a failing host, an unreachable host, host keys pinned to the published
//! ones (another key refused, an address reused by a new server reached as it is), a bastion's
//! recorded key enforced, changed and forgotten, users and environment files, file copies.
//!
//! Each test has its own block of addresses (127.90.<block>.x) so they run in parallel.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::sync::{Arc, Mutex};

use rigger_transport::fanout::{self, Outcome, Reporter, State, Task};
use rigger_transport::ssh::{SshTarget, SshTransport};
use rigger_transport::{Command, ExitStatus, Job, Stream, Transport, TransportError};
use support::{Lab, addresses};

/// Keeps every line, with its server.
#[derive(Default)]
struct Collect(Mutex<Vec<(String, Stream, String)>>);

impl Reporter for Collect {
    fn line(&self, server: &str, stream: Stream, line: &str) {
        self.0
            .lock()
            .unwrap()
            .push((server.to_owned(), stream, line.to_owned()));
    }
}

impl Collect {
    fn lines_of(&self, server: &str) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, stream, _)| s == server && *stream == Stream::Stdout)
            .map(|(_, _, line)| line.clone())
            .collect()
    }
}

fn shell(line: &str) -> Job {
    Job::new(Command::new("/bin/sh").args(["-c", line]))
}

async fn fan_out(
    transports: &[Arc<SshTransport>],
    job: &Job,
    parallel: usize,
) -> (Vec<Outcome>, Arc<Collect>) {
    let collect = Arc::new(Collect::default());
    let jobs = transports
        .iter()
        .map(|t| Task::new(Arc::clone(t) as Arc<dyn Transport>, job.clone()))
        .collect();
    let outcomes = fanout::run(jobs, parallel, Arc::clone(&collect) as Arc<dyn Reporter>).await;
    (outcomes, collect)
}

async fn disconnect(transports: &[Arc<SshTransport>]) {
    for transport in transports {
        transport.disconnect().await;
    }
}

/// The address the server saw the connection arrive on (`$SSH_CONNECTION`'s third field).
const SERVER_ADDRESS: &str = r#"set -- $SSH_CONNECTION; echo "on $3""#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_to_20_hosts_runs_on_each_over_one_connection() {
    let lab = Lab::new();
    let _sshds = lab.sshds(addresses(0, 20));
    let transports: Vec<_> = addresses(0, 20)
        .enumerate()
        .map(|(i, a)| lab.transport(&format!("web-{}", i + 1), lab.target(a)))
        .collect();

    let (outcomes, lines) = fan_out(&transports, &shell(SERVER_ADDRESS), 10).await;
    assert!(fanout::all_ok(&outcomes), "{}", fanout::summary(&outcomes));
    for (i, address) in addresses(0, 20).enumerate() {
        assert_eq!(
            lines.lines_of(&format!("web-{}", i + 1)),
            [format!("on {address}")]
        );
    }
    // Nothing was recorded on first sight: each server's published key is pinned in a file
    // of its own.
    assert!(!lab.settings.known_hosts.exists());
    assert_eq!(
        std::fs::read_dir(lab.settings.pinned_dir())
            .unwrap()
            .count(),
        20
    );

    // A second command reuses each server's master connection.
    let (outcomes, _) = fan_out(&transports, &shell("exit 0"), 20).await;
    assert!(fanout::all_ok(&outcomes));
    for transport in &transports {
        assert!(transport.control_path().exists());
    }
    assert!(fanout::summary(&outcomes).ends_with("20 servers: 20 ok, 0 failed, 0 unreachable\n"));
    disconnect(&transports).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_whose_command_fails_fails_alone() {
    let lab = Lab::new();
    let _sshds = lab.sshds(addresses(1, 5));
    let transports: Vec<_> = addresses(1, 5)
        .enumerate()
        .map(|(i, a)| lab.transport(&format!("worker-{}", i + 1), lab.target(a)))
        .collect();
    let job = shell(
        r#"set -- $SSH_CONNECTION; if [ "$3" = 127.90.1.3 ]; then echo broken >&2; exit 7; fi; echo fine"#,
    );

    let (outcomes, lines) = fan_out(&transports, &job, 10).await;
    let states: Vec<State> = outcomes.iter().map(Outcome::state).collect();
    assert_eq!(
        states,
        [State::Ok, State::Ok, State::Failed, State::Ok, State::Ok]
    );
    assert_eq!(outcomes[2].result.as_ref().unwrap(), &ExitStatus::Code(7));
    assert!(lines.0.lock().unwrap().contains(&(
        "worker-3".into(),
        Stream::Stderr,
        "broken".into()
    )));
    let summary = fanout::summary(&outcomes);
    assert!(
        summary.contains("worker-3  failed       exit 7"),
        "{summary}"
    );
    assert!(
        summary.ends_with("5 servers: 4 ok, 1 failed, 0 unreachable\n"),
        "{summary}"
    );
    disconnect(&transports).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_host_is_reported_and_the_others_still_run() {
    let lab = Lab::new();
    let _sshds = lab.sshds(addresses(2, 3));
    let nothing_there = std::net::Ipv4Addr::new(127, 90, 2, 9);
    let mut transports: Vec<_> = addresses(2, 3)
        .enumerate()
        .map(|(i, a)| lab.transport(&format!("web-{}", i + 1), lab.target(a)))
        .collect();
    // Nothing listens there; whatever key it published, the connection is refused first.
    let published = lab.host_key(std::net::Ipv4Addr::new(127, 90, 2, 1));
    transports.insert(
        1,
        lab.transport(
            "web-9",
            lab.pinned_target(nothing_there, "i-0web9", &published),
        ),
    );

    let (outcomes, lines) = fan_out(&transports, &shell("echo ran"), 10).await;
    let states: Vec<State> = outcomes.iter().map(Outcome::state).collect();
    assert_eq!(
        states,
        [State::Ok, State::Unreachable, State::Ok, State::Ok]
    );
    let error = outcomes[1].result.as_ref().unwrap_err().to_string();
    assert_eq!(
        error,
        "cannot reach web-9 (root@127.90.2.9:22): connect to host 127.90.2.9 port 22: Connection refused"
    );
    for server in ["web-1", "web-2", "web-3"] {
        assert_eq!(lines.lines_of(server), ["ran"]);
    }
    assert!(fanout::summary(&outcomes).ends_with("4 servers: 3 ok, 0 failed, 1 unreachable\n"));
    disconnect(&transports).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_showing_a_key_it_did_not_publish_is_refused() {
    let lab = Lab::new();
    let address = std::net::Ipv4Addr::new(127, 90, 3, 1);
    let other = std::net::Ipv4Addr::new(127, 90, 3, 2);
    let _sshds = lab.sshds([address, other]);
    let ignore = |_: Stream, _: &str| {};
    // The published key is the right one: connected.
    let transport = lab.transport(
        "db-primary",
        lab.pinned_target(address, "i-0aaa", &lab.host_key(address)),
    );
    assert!(
        transport
            .run(&shell("true"), &ignore)
            .await
            .unwrap()
            .success()
    );
    transport.disconnect().await;

    // Another machine answers at the address (its key is not the one published): refused,
    // and there is nothing to forget.
    let transport = lab.transport(
        "db-primary",
        lab.pinned_target(address, "i-0aaa", &lab.host_key(other)),
    );
    let error = transport.run(&shell("true"), &ignore).await.unwrap_err();
    assert!(
        matches!(error, TransportError::HostKeyNotPublished { .. }),
        "{error}"
    );
    assert!(
        error.to_string().starts_with(
            "db-primary (root@127.90.3.1:22) did not show any of the host keys it published \
             (the test's i-0aaa)"
        ),
        "{error}"
    );
    assert!(error.is_unreachable());
    assert!(!transport.forget_host_key().await.unwrap());
    assert!(!lab.settings.known_hosts.exists(), "a key was recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_reused_by_a_new_server_is_reached_without_any_action() {
    let lab = Lab::new();
    let address = std::net::Ipv4Addr::new(127, 90, 8, 1);
    let ignore = |_: Stream, _: &str| {};
    let mut sshd = lab.sshd(address);
    let old_key = lab.host_key(address);
    let old = lab.transport("web-1", lab.pinned_target(address, "i-0old", &old_key));
    assert!(old.run(&shell("true"), &ignore).await.unwrap().success());
    old.disconnect().await;

    // The server is terminated; a new one (new instance id, new host key) gets the address.
    sshd.stop();
    let _sshd = lab.sshd(address);
    let new_key = lab.host_key(address);
    assert_ne!(new_key, old_key);
    let new = lab.transport("web-1", lab.pinned_target(address, "i-0new", &new_key));
    assert!(new.run(&shell("true"), &ignore).await.unwrap().success());
    new.disconnect().await;
    // The old server's keys would not let anything else in under its name.
    let old = lab.transport("web-1", lab.pinned_target(address, "i-0old", &old_key));
    let error = old.run(&shell("true"), &ignore).await.unwrap_err();
    assert!(
        matches!(error, TransportError::HostKeyNotPublished { .. }),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_recorded_key_is_refused_until_forgotten() {
    let lab = Lab::new();
    let address = std::net::Ipv4Addr::new(127, 90, 9, 1);
    let mut sshd = lab.sshd(address);
    lab.record(address);
    let recorded = std::fs::read_to_string(&lab.settings.known_hosts).unwrap();
    let transport = lab.transport("bastion", lab.recorded_target(address));
    let ignore = |_: Stream, _: &str| {};
    assert!(
        transport
            .run(&shell("true"), &ignore)
            .await
            .unwrap()
            .success()
    );
    transport.disconnect().await;

    // The host is rebuilt at the same address, with a new host key.
    sshd.stop();
    let _sshd = lab.sshd(address);
    let transport = lab.transport("bastion", lab.recorded_target(address));
    let error = transport.run(&shell("true"), &ignore).await.unwrap_err();
    assert!(
        matches!(error, TransportError::HostKeyChanged { .. }),
        "{error}"
    );
    let message = error.to_string();
    let known_hosts = lab.settings.known_hosts.display();
    assert!(
        message.starts_with(
            "the host key of bastion (root@127.90.9.1:22) is not the one rigger recorded in"
        ),
        "{message}"
    );
    assert!(
        message.ends_with(&format!(
            "forget the old key with `rigger ssh -e test --forget-host-key bastion` (or `ssh-keygen -R 127.90.9.1 -f {known_hosts}`) and retry"
        )),
        "{message}"
    );
    assert!(error.is_unreachable());
    // The recorded key was kept, not replaced, and nothing is recorded on first sight.
    assert_eq!(
        std::fs::read_to_string(&lab.settings.known_hosts).unwrap(),
        recorded
    );
    assert!(transport.forget_host_key().await.unwrap());
    let error = transport.run(&shell("true"), &ignore).await.unwrap_err();
    assert!(
        matches!(error, TransportError::HostKeyUnknown { .. }),
        "{error}"
    );
    lab.record(address);
    assert!(
        transport
            .run(&shell("true"), &ignore)
            .await
            .unwrap()
            .success()
    );
    transport.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_rigger_did_not_create_needs_its_key_recorded_first() {
    let lab = Lab::new();
    let address = std::net::Ipv4Addr::new(127, 90, 4, 1);
    let _sshd = lab.sshd(address);
    let transport = lab.transport("bastion", lab.recorded_target(address));
    let error = transport.connect().await.unwrap_err();
    assert!(
        matches!(error, TransportError::HostKeyUnknown { .. }),
        "{error}"
    );
    assert!(
        !lab.settings.known_hosts.exists()
            || std::fs::read_to_string(&lab.settings.known_hosts)
                .unwrap()
                .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_behind_a_bastion_share_its_connection() {
    let lab = Lab::new();
    let bastion_address = std::net::Ipv4Addr::new(127, 90, 5, 100);
    let _sshds = lab.sshds(addresses(5, 3).chain([bastion_address]));
    // rigger did not create the bastion: its key is recorded by the operator.
    lab.record(bastion_address);
    let bastion = lab.recorded_target(bastion_address);
    let transports: Vec<_> = addresses(5, 3)
        .enumerate()
        .map(|(i, a)| {
            let target = SshTarget {
                bastion: Some(Box::new(bastion.clone())),
                ..lab.target(a)
            };
            lab.transport(&format!("web-{}", i + 1), target)
        })
        .collect();
    let (outcomes, lines) = fan_out(&transports, &shell(SERVER_ADDRESS), 10).await;
    assert!(fanout::all_ok(&outcomes), "{}", fanout::summary(&outcomes));
    for (i, address) in addresses(5, 3).enumerate() {
        assert_eq!(
            lines.lines_of(&format!("web-{}", i + 1)),
            [format!("on {address}")]
        );
    }
    // The bastion's master connection serves them all.
    let bastion_transport = lab.transport("bastion", bastion);
    assert!(bastion_transport.control_path().exists());
    disconnect(&transports).await;
    bastion_transport.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_as_its_user_with_its_env_file_in_its_directory() {
    let lab = Lab::new();
    let address = std::net::Ipv4Addr::new(127, 90, 6, 1);
    let _sshd = lab.sshd(address);
    // The env file is readable by the job's user only (www-data, whose group has its name, as
    // every service user of a rigger layout), and reachable.
    std::fs::set_permissions(lab.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let app = lab.dir.path().join("app");
    std::fs::create_dir(&app).unwrap();
    let env_file = app.join("app.env");
    std::fs::write(&env_file, "SECRET_KEY=\"s3cr et$\"\nRIGGER_ROLE=worker\n").unwrap();
    std::fs::set_permissions(&env_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    nix::unistd::chown(&env_file, Some(nix::unistd::Uid::from_raw(33)), None).unwrap();

    let job = Job::new(
        Command::new("/bin/sh")
            .args([
                "-c",
                r#"echo "$(id -un) $PWD $RIGGER_ROLE $SECRET_KEY $GREETING""#,
            ])
            .cwd(&app)
            .user("www-data")
            .env("GREETING", "hello there"),
    )
    .env_file(&env_file);
    let transport = lab.transport("worker-1", lab.target(address));
    let lines = Mutex::new(Vec::new());
    let sink = |_: Stream, line: &str| lines.lock().unwrap().push(line.to_owned());
    let status = transport.run(&job, &sink).await.unwrap();
    let lines = lines.into_inner().unwrap();
    assert!(status.success(), "{lines:?}");
    assert_eq!(
        lines,
        [format!(
            "www-data {} worker s3cr et$ hello there",
            app.display()
        )]
    );
    transport.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_file_writes_atomically_with_the_mode() {
    let lab = Lab::new();
    let address = std::net::Ipv4Addr::new(127, 90, 7, 1);
    let _sshd = lab.sshd(address);
    let source = lab.dir.path().join("release.tar");
    std::fs::write(&source, b"the release\n").unwrap();
    let destination = lab.dir.path().join("copied.tar");
    let transport = lab.transport("web-1", lab.target(address));
    transport
        .copy_file(&source, &destination, 0o640)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&destination).unwrap(), b"the release\n");
    let mode = std::fs::metadata(&destination)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);
    let error = transport
        .copy_file(&source, &lab.dir.path().join("missing/dir/x"), 0o600)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("failed: exit 1:"), "{error}");
    transport.disconnect().await;
}
