//! Deploys against moto's server: a release goes to the environment's bucket, the groups
//! point at its launch template (or configuration) and every old server is replaced, old
//! workers get a warm shutdown, the history records it; a second deploy is refused while the
//! lock in SSM is held, naming the holder; a release whose servers fail the health check rolls
//! every group back, with the load balancer's reason and the servers' evidence; `rollback`
//! goes back to an earlier release; a rollout cut off half-way is recovered by the next one.
//!
//! Moto reports every instance healthy, so the rollback test feeds the health gate from a
//! fake that fails the bad release's servers; everything else is moto's real API.

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use common::{Moto, actions, config, config_text, provider, quiet};
use futures_util::future::BoxFuture;
use rigger_aws::AwsError;
use rigger_aws::deploy::{
    Artifact, DeployRecord, HealthSource, Requester, Rollout, RolloutOptions, ServerOps,
};

fn options() -> RolloutOptions {
    RolloutOptions {
        health_timeout: Duration::from_secs(30),
        drain: Duration::from_millis(10),
        poll: Duration::from_millis(50),
        ..RolloutOptions::default()
    }
}

fn requester(who: &str) -> Requester {
    Requester {
        who: who.to_owned(),
        pid: 4242,
        process_alive: |_| true,
    }
}

/// Records what the rollout asked of the servers; answers like a server whose app fails.
#[derive(Default)]
struct RecordingServers {
    stopped: Mutex<Vec<String>>,
    diagnosed: Mutex<Vec<String>>,
}

impl ServerOps for RecordingServers {
    fn stop_workers(&self, instances: &[String], timeout: Duration) -> Result<(), String> {
        assert_eq!(timeout, options().worker_stop_timeout);
        self.stopped
            .lock()
            .unwrap()
            .extend(instances.iter().cloned());
        Ok(())
    }

    fn diagnose(&self, instances: &[String]) -> String {
        self.diagnosed
            .lock()
            .unwrap()
            .extend(instances.iter().cloned());
        "  GET /healthcheck.html answered 500: Server Error".into()
    }
}

fn rollout<'a>(servers: &'a RecordingServers, health: Option<&'a dyn HealthSource>) -> Rollout<'a> {
    Rollout {
        options: options(),
        servers,
        health,
        report: &quiet,
    }
}

async fn deploy(
    provider: &rigger_aws::Provider,
    dir: &std::path::Path,
    id: &str,
    servers: &RecordingServers,
    health: Option<&dyn HealthSource>,
) -> DeployRecord {
    let started = provider
        .start_deploy(&artifact(dir, id), &requester("alice@laptop"), &quiet)
        .await
        .unwrap();
    provider
        .finish_deploy(started, &rollout(servers, health))
        .await
        .unwrap()
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

/// Who holds the deploy lock.
async fn lock(provider: &rigger_aws::Provider) -> Option<rigger_aws::deploy::LockHolder> {
    rigger_aws::deploy::lock_holder(&provider.env, &provider.clients)
        .await
        .unwrap()
}

/// How many buckets moto holds.
async fn buckets(provider: &rigger_aws::Provider) -> usize {
    provider
        .clients
        .s3
        .list_buckets()
        .send()
        .await
        .unwrap()
        .buckets()
        .len()
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
        .start_deploy(
            &artifact(dir.path(), "r2"),
            &requester("alice@laptop"),
            &quiet,
        )
        .await
        .unwrap();
    // The release is in the environment's bucket.
    assert!(started.bucket.starts_with("shop-prod-releases-"));
    assert!(
        rigger_aws::releases::exists(&provider.clients, &started.bucket, "r2")
            .await
            .unwrap()
    );
    let servers = RecordingServers::default();
    let record = provider
        .finish_deploy(started, &rollout(&servers, None))
        .await
        .unwrap();
    assert_eq!(record.result, "succeeded", "{record:?}");
    // The old worker got its warm shutdown before it was terminated; nothing was diagnosed.
    assert_eq!(*servers.stopped.lock().unwrap(), old_worker);
    assert!(servers.diagnosed.lock().unwrap().is_empty());

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
    assert_eq!(lock(&provider).await, None);

    // `down` removes the bucket and the deploy's parameters too.
    provider.down(&quiet).await.unwrap();
    assert!(
        rigger_aws::deploy::parameters(&provider.env, &provider.clients)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(buckets(&provider).await, 0);
}

#[tokio::test]
async fn a_deploy_before_up_is_refused_with_nothing_uploaded_or_locked() {
    let moto = Moto::start();
    let config = config(&config_text("", 1, "t3.small"));
    let provider = provider(&moto, config).await;
    let dir = tempfile::tempdir().unwrap();
    let error = provider
        .start_deploy(
            &artifact(dir.path(), "r2"),
            &requester("alice@laptop"),
            &quiet,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("rigger up"), "{error}");
    assert_eq!(lock(&provider).await, None);
    assert_eq!(buckets(&provider).await, 0);
}

#[tokio::test]
async fn a_second_concurrent_deploy_is_refused_naming_the_holder() {
    let moto = Moto::start();
    let config = config(&config_text("", 1, "t3.small"));
    let provider = provider(&moto, config).await;
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let dir = tempfile::tempdir().unwrap();

    let first = provider
        .start_deploy(
            &artifact(dir.path(), "r2"),
            &requester("alice@laptop"),
            &quiet,
        )
        .await
        .unwrap();
    let refused = provider
        .start_deploy(&artifact(dir.path(), "r3"), &requester("bob@desk"), &quiet)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("held by alice@laptop"), "{refused}");
    assert!(refused.contains("deploy r2"), "{refused}");
    assert!(refused.contains("rigger lock release"), "{refused}");

    // A long rollout renews its lock; a lock that is no longer its own is not renewed.
    let renewed = rigger_aws::deploy::renew_lock(
        &provider.env,
        &provider.clients,
        &first.lock,
        first.lock.since + 600,
    )
    .await
    .unwrap();
    assert_eq!(
        renewed.expires,
        first.lock.since + 600 + rigger_aws::deploy::LOCK_TTL.as_secs()
    );
    assert_eq!(lock(&provider).await, Some(renewed.clone()));
    let stale_copy = first.lock.clone();
    let refused = rigger_aws::deploy::renew_lock(
        &provider.env,
        &provider.clients,
        &stale_copy,
        first.lock.since + 900,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(refused.contains("now held by alice@laptop"), "{refused}");

    // The holder finishes; then the next deploy may go.
    provider
        .abandon_deploy(first, "migrations failed")
        .await
        .unwrap();
    let second = provider
        .start_deploy(&artifact(dir.path(), "r3"), &requester("bob@desk"), &quiet)
        .await
        .unwrap();
    let holder = lock(&provider).await.unwrap();
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

/// Fails every server launched from `bad` (a launch template name prefix' release) as the
/// classic load balancer would, and passes the others: the group's own record of what each
/// instance was launched from decides.
struct FailsRelease<'a> {
    provider: &'a rigger_aws::Provider,
    bad: &'a str,
}

impl HealthSource for FailsRelease<'_> {
    fn states<'a>(
        &'a self,
        servers: &'a [String],
    ) -> BoxFuture<'a, Result<BTreeMap<String, String>, AwsError>> {
        Box::pin(async move {
            let (_, live) = self.provider.observe().await?;
            let mut states = BTreeMap::new();
            for group in live.groups.values() {
                for member in &group.instances {
                    if !servers.contains(&member.id) {
                        continue;
                    }
                    let bad = member
                        .launch_template
                        .as_deref()
                        .is_some_and(|t| t.ends_with(&format!("-{}", self.bad)));
                    let state = if bad {
                        "OutOfService (Instance has failed at least the UnhealthyThreshold number of health checks consecutively.)"
                    } else {
                        "UP"
                    };
                    states.insert(member.id.clone(), state.to_owned());
                }
            }
            Ok(states)
        })
    }
}

#[tokio::test]
async fn a_release_failing_its_health_check_rolls_every_group_back_and_says_why() {
    let moto = Moto::start();
    let config = config(&config_text("", 2, "t3.small"));
    let provider = provider(&moto, config).await;
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let servers = RecordingServers::default();
    let good = deploy(&provider, dir.path(), "r2", &servers, None).await;
    assert_eq!(good.result, "succeeded");
    let (_, web_before) = group_members(&provider, "shop-prod-web").await;
    let (_, worker_before) = group_members(&provider, "shop-prod-worker").await;

    let failing = FailsRelease {
        provider: &provider,
        bad: "r3",
    };
    let servers = RecordingServers::default();
    let mut options = options();
    options.health_timeout = Duration::from_millis(600);
    let started = provider
        .start_deploy(
            &artifact(dir.path(), "r3"),
            &requester("alice@laptop"),
            &quiet,
        )
        .await
        .unwrap();
    let record = provider
        .finish_deploy(
            started,
            &Rollout {
                options,
                servers: &servers,
                health: Some(&failing),
                report: &quiet,
            },
        )
        .await
        .unwrap();
    assert_eq!(record.result, "rolled back", "{record:?}");
    // The reason names the group, the load balancer's reason and the server's evidence.
    assert!(
        record
            .reason
            .starts_with("shop-prod-web: not healthy within 0 s"),
        "{}",
        record.reason
    );
    assert!(
        record.reason.contains("UnhealthyThreshold"),
        "{}",
        record.reason
    );
    assert!(
        record.reason.contains("answered 500: Server Error"),
        "{}",
        record.reason
    );
    assert_eq!(servers.diagnosed.lock().unwrap().len(), 1);

    // Web never switched a server: the same servers serve, on r2; the worker was untouched.
    let (template, web_after) = group_members(&provider, "shop-prod-web").await;
    assert_eq!(template.as_deref(), Some("shop-prod-web-r2"));
    assert_eq!(web_after, web_before);
    let (template, worker_after) = group_members(&provider, "shop-prod-worker").await;
    assert_eq!(template.as_deref(), Some("shop-prod-worker-r2"));
    assert_eq!(worker_after, worker_before);
    assert!(servers.stopped.lock().unwrap().is_empty());
    // r3's templates are gone, nothing is left detached, and the plan is empty.
    let plan = provider.plan(common::RELEASE).await.unwrap();
    assert!(plan.is_empty(), "{:#?}", actions(&plan));
    let history = rigger_aws::deploy::history(&provider.env, &provider.clients)
        .await
        .unwrap();
    let results: Vec<(&str, &str)> = history
        .iter()
        .map(|r| (r.release.as_str(), r.result.as_str()))
        .collect();
    assert_eq!(results, [("r2", "succeeded"), ("r3", "rolled back")]);
}

#[tokio::test]
async fn rollback_deploys_the_previous_release_again_without_rebuilding_it() {
    let moto = Moto::start();
    let config = config(&config_text("", 1, "t3.small"));
    let provider = provider(&moto, config).await;
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let servers = RecordingServers::default();
    for id in ["r2", "r3"] {
        let record = deploy(&provider, dir.path(), id, &servers, None).await;
        assert_eq!(record.result, "succeeded", "{record:?}");
    }

    let started = provider
        .start_rollback(None, &requester("bob@desk"), &quiet)
        .await
        .unwrap();
    assert_eq!(started.release, "r2");
    assert_eq!(started.revision, "0123456789abcdef");
    let record = provider
        .finish_deploy(started, &rollout(&servers, None))
        .await
        .unwrap();
    assert_eq!(record.result, "succeeded", "{record:?}");
    let (template, _) = group_members(&provider, "shop-prod-web").await;
    assert_eq!(template.as_deref(), Some("shop-prod-web-r2"));

    // An unknown release is refused, naming it, with nothing changed.
    let error = provider
        .start_rollback(Some("r9"), &requester("bob@desk"), &quiet)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("r9"), "{error}");
    assert!(error.contains("rigger releases"), "{error}");
    assert_eq!(lock(&provider).await, None);
    // `--to` a release whose object is gone from the bucket is refused too.
    let bucket = rigger_aws::releases::find(&provider.env, &provider.clients)
        .await
        .unwrap()
        .unwrap();
    provider
        .clients
        .s3
        .delete_object()
        .bucket(&bucket)
        .key(rigger_aws::releases::object_key("r3"))
        .send()
        .await
        .unwrap();
    let error = provider
        .start_rollback(Some("r3"), &requester("bob@desk"), &quiet)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("no longer in the environment's bucket"),
        "{error}"
    );
}

#[tokio::test]
async fn a_rollout_cut_off_half_way_is_recovered_by_the_next_deploy() {
    let moto = Moto::start();
    let config = config(&config_text("", 2, "t3.small"));
    let provider = provider(&moto, config).await;
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let servers = RecordingServers::default();

    // r2's rollout is dropped (as a killed process stops) while the first old web server is
    // draining: detached from its group, not yet terminated.
    let started = provider
        .start_deploy(
            &artifact(dir.path(), "r2"),
            &requester("alice@laptop"),
            &quiet,
        )
        .await
        .unwrap();
    let mut slow = options();
    slow.drain = Duration::from_secs(30);
    let interrupted = Rollout {
        options: slow,
        servers: &servers,
        health: None,
        report: &quiet,
    };
    let detached = async {
        loop {
            let (_, live) = provider.observe().await.unwrap();
            if !live.detached_group_instances().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        record = provider.finish_deploy(started, &interrupted) => panic!("the rollout finished: {record:?}"),
        () = detached => {}
    }
    // What it left: a running server outside any group (which `plan` now shows), a group
    // raised by one, the lock.
    let plan = provider.plan(common::RELEASE).await.unwrap();
    assert!(!plan.is_empty(), "the detached server is invisible to plan");

    // The same host, the holder's process gone: the next deploy takes over at once.
    let next = Requester {
        who: "alice@laptop".into(),
        pid: 99,
        process_alive: |_| false,
    };
    let started = provider
        .start_deploy(&artifact(dir.path(), "r3"), &next, &quiet)
        .await
        .unwrap();
    let record = provider
        .finish_deploy(started, &rollout(&servers, None))
        .await
        .unwrap();
    assert_eq!(record.result, "succeeded", "{record:?}");

    let (template, web) = group_members(&provider, "shop-prod-web").await;
    assert_eq!(template.as_deref(), Some("shop-prod-web-r3"));
    assert_eq!(
        web.len(),
        2,
        "the group's size from before the interrupted rollout"
    );
    let (_, live) = provider.observe().await.unwrap();
    assert!(live.detached_group_instances().is_empty());
    assert_eq!(live.groups["shop-prod-web"].max, 4);
    let plan = provider.plan(common::RELEASE).await.unwrap();
    assert!(plan.is_empty(), "{:#?}", actions(&plan));
    let history = rigger_aws::deploy::history(&provider.env, &provider.clients)
        .await
        .unwrap();
    let results: Vec<(&str, &str)> = history
        .iter()
        .map(|r| (r.release.as_str(), r.result.as_str()))
        .collect();
    assert_eq!(results, [("r2", "interrupted"), ("r3", "succeeded")]);
}

#[tokio::test]
async fn a_deploy_with_launch_configurations_replaces_every_server() {
    let moto = Moto::start();
    let config = config(&config_text("launch = \"configuration\"", 2, "t3.small"));
    let provider = provider(&moto, config).await;
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let (_, old_web) = group_members(&provider, "shop-prod-web").await;
    let dir = tempfile::tempdir().unwrap();
    let servers = RecordingServers::default();
    let record = deploy(&provider, dir.path(), "r2", &servers, None).await;
    assert_eq!(record.result, "succeeded", "{record:?}");

    let (_, live) = provider.observe().await.unwrap();
    let web = &live.groups["shop-prod-web"];
    let configuration = web.launch_configuration.clone().unwrap();
    assert!(
        configuration.starts_with("shop-prod-web-") && configuration.ends_with("-r2"),
        "{configuration}"
    );
    assert_eq!(web.instances.len(), 2);
    for member in &web.instances {
        assert!(!old_web.contains(&member.id));
        assert_eq!(
            member.launch_configuration.as_deref(),
            Some(configuration.as_str())
        );
    }
    let plan = provider.plan(common::RELEASE).await.unwrap();
    assert!(plan.is_empty(), "{:#?}", actions(&plan));
}

#[tokio::test]
async fn a_deploy_behind_an_application_load_balancer_replaces_every_target() {
    let moto = Moto::start();
    let config = config(&config_text(
        "load_balancer = \"application\"",
        2,
        "t3.small",
    ));
    let provider = provider(&moto, config).await;
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let (_, old_web) = group_members(&provider, "shop-prod-web").await;
    let dir = tempfile::tempdir().unwrap();
    let servers = RecordingServers::default();
    let record = deploy(&provider, dir.path(), "r2", &servers, None).await;
    assert_eq!(record.result, "succeeded", "{record:?}");

    let (template, new_web) = group_members(&provider, "shop-prod-web").await;
    assert_eq!(template.as_deref(), Some("shop-prod-web-r2"));
    assert!(new_web.iter().all(|id| !old_web.contains(id)));
    // The target group serves exactly the new servers: the old ones were deregistered.
    let (_, live) = provider.observe().await.unwrap();
    let lb = live
        .load_balancer(rigger_config::LoadBalancerKind::Application)
        .unwrap();
    let health = rigger_aws::loadbalancer::instance_health(
        &provider.clients,
        lb,
        &provider.env.names.load_balancer(),
    )
    .await
    .unwrap();
    let mut targets: Vec<&String> = health.keys().collect();
    targets.sort();
    assert_eq!(targets, new_web.iter().collect::<Vec<_>>(), "{health:?}");
    let plan = provider.plan(common::RELEASE).await.unwrap();
    assert!(plan.is_empty(), "{:#?}", actions(&plan));
}
