//! An interrupted `rigger up` on AWS (the process killed mid-way), re-run, converges: the
//! second run finishes the environment and a plan afterwards finds nothing to do. Against
//! moto's server, like the AWS provider's own tests; nothing connects anywhere else.

mod hermetic;
use std::time::{Duration, Instant};

#[path = "../../rigger-aws/tests/common/mod.rs"]
mod moto;

mod aws_cli;
use aws_cli::{rigger, text};

#[test]
fn an_interrupted_up_re_run_converges() {
    let moto = moto::Moto::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rigger.toml"),
        moto::config_text("", 2, "t3.small"),
    )
    .unwrap();
    aws_cli::committed_app(dir.path());

    // Kill `up` part-way: shorter and shorter delays until one run is cut before finishing.
    let mut interrupted = false;
    for delay_ms in [900u64, 600, 400, 250, 150, 80] {
        let mut child = rigger(dir.path(), &moto.url, &["up"]).spawn().unwrap();
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(delay_ms) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            child.wait().unwrap();
            interrupted = true;
            eprintln!("killed `rigger up` after {delay_ms} ms");
            break;
        }
        // It finished first: start again from nothing, with less time.
        let down = rigger(dir.path(), &moto.url, &["down", "--yes"])
            .output()
            .unwrap();
        assert!(down.status.success(), "{}", text(&down));
    }
    assert!(
        interrupted,
        "every `rigger up` finished before it could be interrupted"
    );

    let plan = rigger(dir.path(), &moto.url, &["plan"]).output().unwrap();
    assert!(plan.status.success(), "{}", text(&plan));
    assert!(
        !String::from_utf8_lossy(&plan.stdout).contains("No changes"),
        "the interrupted run did everything: {}",
        text(&plan)
    );

    let again = rigger(dir.path(), &moto.url, &["up"]).output().unwrap();
    assert!(
        again.status.success(),
        "re-running up after the interruption failed: {}",
        text(&again)
    );
    let plan = rigger(dir.path(), &moto.url, &["plan"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&plan.stdout).contains("No changes"),
        "{}",
        text(&plan)
    );
    let down = rigger(dir.path(), &moto.url, &["down", "--yes"])
        .output()
        .unwrap();
    assert!(down.status.success(), "{}", text(&down));
}
