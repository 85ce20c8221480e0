//! Deploys against moto's server: a release goes to the environment's bucket, the groups
//! point at its launch template and every old server is replaced, the history records it; a
//! second deploy is refused while the lock in SSM is held, naming the holder. (Moto reports
//! every instance healthy: the rollback decision is unit-tested with a fake health source in
//! `src/deploy.rs`.)

mod common;

use std::time::Duration;

use common::{Moto, actions, config, config_text, provider, quiet};
use rigger_aws::deploy::{Artifact, RolloutOptions};

fn options() -> RolloutOptions {
    RolloutOptions {
        health_timeout: Duration::from_secs(30),
        drain: Duration::from_millis(10),
        poll: Duration::from_millis(50),
        ..RolloutOptions::default()
    }
}

fn artifact(dir: &std::path::Path, id: &str) -> Artifact {
    let tarball = dir.join(format!("{id}.tar.gz"));
    std::fs::write(&tarball, b"not really a tarball").unwrap();
    Artifact {
        id: id.to_owned(),
        revision: "0123456789abcdef".into(),
        tarball,
    }
}

async fn group_members(
    provider: &rigger_aws::Provider,
    group: &str,
) -> (Option<String>, Vec<String>) {
    let answer = provider
        .clients
        .autoscaling
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(group)
        .send()
        .await
        .unwrap();
    let group = &answer.auto_scaling_groups()[0];
    let template = group
        .launch_template()
        .and_then(|t| t.launch_template_name())
        .map(str::to_owned);
    let mut ids: Vec<String> = group
        .instances()
        .iter()
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect();
    ids.sort();
    (template, ids)
}

#[tokio::test]
async fn a_release_replaces_every_server_and_is_recorded() {
    let moto = Moto::start();
    let config = config(&config_text("", 2, "t3.small"));
    let provider = provider(&moto, config).await;
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let (_, old_web) = group_members(&provider, "shop-prod-web").await;
    let (_, old_worker) = group_members(&provider, "shop-prod-worker").await;
    assert_eq!(old_web.len(), 2);

    let dir = tempfile::tempdir().unwrap();
    let started = provider
        .start_deploy(&artifact(dir.path(), "r2"), "alice@laptop", &quiet)
        .await
        .unwrap();
    // The release is in the environment's bucket.
    assert!(started.bucket.starts_with("shop-prod-releases-"));
    assert!(
        rigger_aws::releases::exists(&provider.clients, &started.bucket, "r2")
            .await
            .unwrap()
    );
    let record = provider
        .finish_deploy(started, &options(), &quiet)
        .await
        .unwrap();
    assert_eq!(record.result, "succeeded", "{record:?}");

    let (template, new_web) = group_members(&provider, "shop-prod-web").await;
    assert_eq!(template.as_deref(), Some("shop-prod-web-r2"));
    assert_eq!(new_web.len(), 2);
    assert!(
        new_web.iter().all(|id| !old_web.contains(id)),
        "{old_web:?} -> {new_web:?}"
    );
    let (template, new_worker) = group_members(&provider, "shop-prod-worker").await;
    assert_eq!(template.as_deref(), Some("shop-prod-worker-r2"));
    assert!(new_worker.iter().all(|id| !old_worker.contains(id)));

    // The old release's templates are gone, and `up` keeps the deployed release.
    let plan = provider.plan(common::RELEASE).await.unwrap();
    assert!(plan.is_empty(), "{:#?}", actions(&plan));

    let history = rigger_aws::deploy::history(&provider.env, &provider.clients)
        .await
        .unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(
        (
            history[0].release.as_str(),
            history[0].result.as_str(),
            history[0].by.as_str()
        ),
        ("r2", "succeeded", "alice@laptop")
    );
    // The lock was released.
    assert_eq!(
        rigger_aws::deploy::lock_holder(&provider.env, &provider.clients)
            .await
            .unwrap(),
        None
    );

    // `down` removes the bucket and the deploy's parameters too.
    provider.down(&quiet).await.unwrap();
    assert!(
        rigger_aws::deploy::parameters(&provider.env, &provider.clients)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        provider
            .clients
            .s3
            .list_buckets()
            .send()
            .await
            .unwrap()
            .buckets()
            .is_empty()
    );
}

#[tokio::test]
async fn a_second_concurrent_deploy_is_refused_naming_the_holder() {
    let moto = Moto::start();
    let config = config(&config_text("", 1, "t3.small"));
    let provider = provider(&moto, config).await;
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let dir = tempfile::tempdir().unwrap();

    let first = provider
        .start_deploy(&artifact(dir.path(), "r2"), "alice@laptop", &quiet)
        .await
        .unwrap();
    let refused = provider
        .start_deploy(&artifact(dir.path(), "r3"), "bob@desk", &quiet)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("held by alice@laptop"), "{refused}");
    assert!(refused.contains("deploy r2"), "{refused}");
    assert!(refused.contains("rigger lock release"), "{refused}");

    // The holder finishes; then the next deploy may go.
    provider
        .abandon_deploy(first, "migrations failed")
        .await
        .unwrap();
    let second = provider
        .start_deploy(&artifact(dir.path(), "r3"), "bob@desk", &quiet)
        .await
        .unwrap();
    let holder = rigger_aws::deploy::lock_holder(&provider.env, &provider.clients)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(holder.who, "bob@desk");
    provider.abandon_deploy(second, "test").await.unwrap();
    let history = rigger_aws::deploy::history(&provider.env, &provider.clients)
        .await
        .unwrap();
    assert_eq!(
        history
            .iter()
            .map(|r| r.result.as_str())
            .collect::<Vec<_>>(),
        ["failed", "failed"]
    );
}
