//! Wall time of a full create, of a no-change plan and of a rolling deploy of the test
//! environment (2 web, 1 worker, cache/queue, database primary and replica) against moto's
//! server. Run by `bench/aws-up`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use rigger_aws::deploy::{Artifact, NoServerAccess, Requester, Rollout, RolloutSettings};

#[tokio::main]
async fn main() {
    let moto = common::Moto::start();
    let config = common::config(&common::config_text("", 2, "t3.small"));
    let topology = common::topology(&config);
    let provider = common::provider(&moto, config).await;

    let started = Instant::now();
    let outcome = provider
        .up(common::RELEASE, &common::quiet)
        .await
        .expect("up");
    let create = started.elapsed();
    assert_eq!(outcome.plan.summary().create, topology.resources.len());

    let mut plans = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let plan = provider.plan(common::RELEASE).await.expect("plan");
        plans.push(started.elapsed());
        assert!(plan.is_empty(), "{:?}", common::actions(&plan));
    }
    plans.sort();

    // A rolling deploy, one server at a time, with the default health polling (every 2 s,
    // two healthy answers in a row) and no drain wait.
    let dir = std::env::temp_dir().join(format!("rigger-bench-aws-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let tarball = dir.join("r2.tar.gz");
    std::fs::write(&tarball, b"release").expect("a tarball");
    let artifact = Artifact {
        id: "r2".into(),
        revision: "0123456789abcdef".into(),
        tarball,
    };
    let requester = Requester {
        who: "bench@localhost".into(),
        pid: 1,
        process_alive: |_| true,
    };
    let options = RolloutSettings {
        drain_timeout: Duration::ZERO,
        ..RolloutSettings::default()
    };
    let poll = options.poll;
    let started = Instant::now();
    let deploy = provider
        .start_deploy(&artifact, &requester, &common::quiet)
        .await
        .expect("start the deploy");
    let servers = NoServerAccess("the emulator's servers cannot be reached");
    let record = provider
        .finish_deploy(
            deploy,
            &Rollout {
                options,
                servers: &servers,
                health: None,
                report: &common::quiet,
            },
        )
        .await
        .expect("deploy");
    let deploy_time = started.elapsed();
    assert_eq!(record.result, "succeeded", "{record:?}");
    let _ = std::fs::remove_dir_all(&dir);

    let started = Instant::now();
    provider.down(&common::quiet).await.expect("down");
    let down = started.elapsed();

    println!(
        "full create ({} resources): {:.0} ms",
        topology.resources.len(),
        create.as_secs_f64() * 1000.0
    );
    println!(
        "no-change plan: {:.0} ms (median of 5; min {:.0} ms)",
        plans[2].as_secs_f64() * 1000.0,
        plans[0].as_secs_f64() * 1000.0
    );
    // Moto answers healthy at once, so each batch sleeps exactly one poll interval between its
    // two healthy observations: that much of the figure is the gate's design, not measured work.
    println!(
        "rolling deploy (3 servers, one at a time): {:.0} ms, including 3 health polls of {:.0} ms by design",
        deploy_time.as_secs_f64() * 1000.0,
        poll.as_secs_f64() * 1000.0
    );
    println!("down: {:.0} ms", down.as_secs_f64() * 1000.0);
}
