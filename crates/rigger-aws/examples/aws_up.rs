//! Wall time of a full create and of a no-change plan of the test environment (2 web, 1 worker,
//! cache/queue, database primary and replica) against moto's server. Run by `bench/aws-up`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

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
    println!("down: {:.0} ms", down.as_secs_f64() * 1000.0);
}
