//! Database operations against moto's server, the parts made of AWS calls (what runs on the
//! servers goes over SSH, which moto's fake addresses cannot take): the primary and replica
//! found by their tags, a failover's fencing and renaming, launch templates pointing at the
//! new primary, the plan afterwards wanting only the replica, `up` building it, `down`
//! removing everything with the fenced server; backups' listing and retention in the bucket;
//! a database server's user-data naming the volume attached to it, and `down` deleting the
//! host keys the servers published.

mod common;

use common::{Moto, actions, config, config_text, provider, quiet};
use rigger_aws::database::{self, FENCED_TAG, SERVER_TAG};

async fn instance_tags(
    provider: &rigger_aws::Provider,
    id: &str,
) -> (String, std::collections::BTreeMap<String, String>) {
    let answer = provider
        .clients
        .ec2
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .unwrap();
    let instance = &answer.reservations()[0].instances()[0];
    (
        instance
            .state()
            .unwrap()
            .name()
            .unwrap()
            .as_str()
            .to_owned(),
        instance
            .tags()
            .iter()
            .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
            .collect(),
    )
}

/// The boot script of a launch template's servers (its default version's user-data).
async fn template_user_data(provider: &rigger_aws::Provider, name: &str) -> String {
    rigger_aws::userdata::default_version_script(&provider.clients.ec2, name)
        .await
        .unwrap()
}

#[tokio::test]
async fn failover_fences_the_primary_and_up_rebuilds_the_replica() {
    let moto = Moto::start();
    let provider = provider(&moto, config(&config_text("", 1, "t3.small"))).await;
    provider.up(common::RELEASE, &quiet).await.unwrap();

    let before = provider.databases().await.unwrap();
    let primary = before.primary.clone().expect("a primary");
    assert_eq!(
        (primary.name.as_str(), primary.id.as_str()),
        ("db-primary", "db-primary")
    );
    let replica = before.replica(None).unwrap().clone();
    assert_eq!(replica.name, "db-replica1");
    let replica_address = replica.address.clone().unwrap();
    // Unknown names are refused with the list of replicas.
    let error = before.replica(Some("db-replica7")).unwrap_err().to_string();
    assert!(error.contains("the replicas are: db-replica1"), "{error}");

    let done = provider
        .fail_over(&replica.instance_id, &quiet)
        .await
        .unwrap();
    assert_eq!(done.fenced.as_deref(), Some(primary.instance_id.as_str()));
    assert_eq!(done.replicas_to_build, ["db-replica2"]);
    assert_eq!(done.templates, ["shop-prod-web-r1", "shop-prod-worker-r1"]);

    // The old primary: stopped, fenced, renamed; it keeps its recipe id.
    let (state, tags) = instance_tags(&provider, &primary.instance_id).await;
    assert!(matches!(state.as_str(), "stopped" | "stopping"), "{state}");
    assert!(tags.contains_key(FENCED_TAG));
    assert_eq!(tags["Name"], "shop-prod-db-primary-old");
    assert_eq!(tags[SERVER_TAG], "db-primary");
    // The replica is the primary, under the primary's names, with its own recipe id.
    let after = provider.databases().await.unwrap();
    let new_primary = after.primary.clone().unwrap();
    assert_eq!(new_primary.instance_id, replica.instance_id);
    assert_eq!(
        (new_primary.name.as_str(), new_primary.id.as_str()),
        ("db-primary", "db-replica1")
    );
    assert!(after.replicas.is_empty());
    assert_eq!(after.fenced.len(), 1);
    // Servers the groups launch from now on connect to it and check its certificate's name.
    for template in ["shop-prod-web-r1", "shop-prod-worker-r1"] {
        let script = template_user_data(&provider, template).await;
        let stunnel = rigger_aws::userdata::file_in(&script, "stunnel.conf")
            .unwrap_or_else(|| panic!("no stunnel.conf in {template}'s user-data"));
        assert!(
            stunnel.contains(&format!("connect = {replica_address}:5432"))
                && stunnel.contains("checkHost = db-replica1"),
            "{template}: {stunnel}"
        );
    }

    // The plan wants only the replica again (not the fenced server: neither deleted nor
    // reused), which up builds, under a new recipe id.
    let plan = provider.plan(common::RELEASE).await.unwrap();
    let steps: Vec<String> = actions(&plan)
        .iter()
        .map(|a| a.split(':').next().unwrap().to_owned())
        .collect();
    assert_eq!(
        steps,
        [
            "Create volume shop-prod-db-replica1-data",
            "Create server shop-prod-db-replica1",
        ],
        "{:#?}",
        actions(&plan)
    );
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let rebuilt = provider.databases().await.unwrap();
    let replica = rebuilt.replica(None).unwrap();
    assert_eq!(
        (replica.name.as_str(), replica.id.as_str()),
        ("db-replica1", "db-replica2")
    );
    assert_ne!(replica.address.as_deref(), Some(replica_address.as_str()));
    assert!(provider.plan(common::RELEASE).await.unwrap().is_empty());

    // Reseed: the replica and its volume go, its interface (address, recipe id) stays; up
    // builds it again.
    provider
        .prepare_reseed("db-replica1", &quiet)
        .await
        .unwrap();
    assert!(provider.databases().await.unwrap().replicas.is_empty());
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let reseeded = provider.databases().await.unwrap();
    let again = reseeded.replica(None).unwrap();
    assert_eq!(
        (again.id.as_str(), again.address.as_deref()),
        ("db-replica2", replica.address.as_deref())
    );
    let error = provider
        .prepare_reseed("db-replica5", &quiet)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("the replicas are: db-replica1"), "{error}");

    provider.down(&quiet).await.unwrap();
    let left = provider
        .clients
        .ec2
        .describe_instances()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("tag:project")
                .values("shop")
                .build(),
        )
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .values("stopping")
                .values("stopped")
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(left.reservations().is_empty(), "{left:?}");
    let volumes = provider
        .clients
        .ec2
        .describe_volumes()
        .send()
        .await
        .unwrap();
    assert!(
        volumes
            .volumes()
            .iter()
            .all(|v| !v.tags().iter().any(|t| t.key() == Some("project"))),
        "{volumes:?}"
    );
}

#[tokio::test]
async fn failover_without_a_replica_is_refused() {
    let moto = Moto::start();
    let text = config_text("", 1, "t3.small").replace("replicas = 1", "replicas = 0");
    let provider = provider(&moto, config(&text)).await;
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let databases = provider.databases().await.unwrap();
    assert!(databases.primary.is_some());
    let error = databases.replica(None).unwrap_err().to_string();
    assert!(
        error.contains("no replica") && error.contains("rigger up"),
        "{error}"
    );
}

#[tokio::test]
async fn backups_are_listed_oldest_first_and_pruned_to_the_newest() {
    let moto = Moto::start();
    let provider = provider(&moto, config(&config_text("", 1, "t3.small"))).await;
    // No bucket before up: a clear error.
    let error = provider.bucket().await.unwrap_err().to_string();
    assert!(error.contains("rigger up"), "{error}");
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let bucket = provider.bucket().await.unwrap();
    let s3 = &provider.clients.s3;
    let names: Vec<String> = [300, 100, 200, 400]
        .iter()
        .map(|t| rigger_engine::backups::backup_name("shop", 1_767_225_600 + t))
        .collect();
    for name in &names {
        s3.put_object()
            .bucket(&bucket)
            .key(database::backup_key(name))
            .body(b"PGDMP".to_vec().into())
            .send()
            .await
            .unwrap();
    }
    // An upload that never finished is not a backup.
    s3.put_object()
        .bucket(&bucket)
        .key(database::backup_key("shop-x.dump.partial"))
        .body(b"PG".to_vec().into())
        .send()
        .await
        .unwrap();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        database::list_backups(&provider.clients, &bucket)
            .await
            .unwrap(),
        sorted
    );
    let deleted = database::prune_backups(&provider.clients, &bucket, 2)
        .await
        .unwrap();
    assert_eq!(deleted, sorted[..2]);
    assert_eq!(
        database::list_backups(&provider.clients, &bucket)
            .await
            .unwrap(),
        sorted[2..]
    );
    // At least one is always kept.
    database::prune_backups(&provider.clients, &bucket, 0)
        .await
        .unwrap();
    assert_eq!(
        database::list_backups(&provider.clients, &bucket)
            .await
            .unwrap(),
        sorted[3..]
    );
}

/// The user-data an instance was launched with (gzipped; moto may hand it back base64
/// encoded once more).
async fn instance_user_data(provider: &rigger_aws::Provider, id: &str) -> String {
    let answer = provider
        .clients
        .ec2
        .describe_instance_attribute()
        .instance_id(id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    rigger_aws::userdata::script_of(answer.user_data().and_then(|u| u.value()).unwrap()).unwrap()
}

#[tokio::test]
async fn stand_alone_servers_boot_with_their_volume_id_and_down_deletes_their_host_keys() {
    let moto = Moto::start();
    let provider = provider(&moto, config(&config_text("", 1, "t3.small"))).await;
    provider.up(common::RELEASE, &quiet).await.unwrap();
    let servers = provider.servers().await.unwrap();
    let primary = servers.iter().find(|s| s.id == "db-primary").unwrap();
    // The volume rigger made for it, and attached to it, is the one its script looks for.
    let volumes = provider
        .clients
        .ec2
        .describe_volumes()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("tag:Name")
                .values("shop-prod-db-primary-data")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let volume = &volumes.volumes()[0];
    let volume_id = volume.volume_id().unwrap();
    assert_eq!(
        volume.attachments()[0].instance_id(),
        Some(primary.instance_id.as_str())
    );
    let script = instance_user_data(&provider, &primary.instance_id).await;
    assert!(
        script.contains(&format!(
            "\nmount_data_volume /var/lib/rigger {volume_id}\n"
        )),
        "{volume_id} not in the script"
    );

    // Every server publishes its keys at boot (done here as its user-data would); `down`
    // deletes them with the servers.
    for server in &servers {
        let name = rigger_aws::hostkeys::parameter(&provider.env, &server.instance_id);
        rigger_aws::parameters::put(&provider.clients, &name, "ssh-ed25519 AAAA")
            .await
            .unwrap();
    }
    assert_eq!(
        rigger_aws::hostkeys::published(&provider.env, &provider.clients)
            .await
            .unwrap()
            .len(),
        servers.len()
    );
    provider.down(&quiet).await.unwrap();
    assert!(
        rigger_aws::hostkeys::published(&provider.env, &provider.clients)
            .await
            .unwrap()
            .is_empty()
    );
}
