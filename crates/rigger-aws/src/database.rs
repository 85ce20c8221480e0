//! Database operations on AWS, the parts made of AWS calls: which server is the primary and
//! which are replicas ([`databases`]), a failover's fencing and renaming
//! ([`Provider::fail_over`]), a replica's replacement ([`Provider::prepare_reseed`]), and the
//! backups in the environment's bucket ([`list_backups`], [`prune_backups`]). What runs on
//! the servers (pausing PgBouncer, promoting, dumping) goes over SSH from the CLI.
//!
//! Identity. A database server has a recipe id (`db-primary`, `db-replica1`: its certificate,
//! its replication slot `rigger_<id>` and its `application_name` carry it) and a topology
//! name (`<project>-<env>-db-primary`: its `Name` tag, and its volume's and network
//! interface's names). They start equal; a failover keeps the promoted server's recipe id
//! (tag [`SERVER_TAG`]) and gives it the primary's names, so the plan, which only knows the
//! names, finds the primary it wants and only the replica missing. The replica `up` then
//! builds needs a recipe id and an address that nobody holds: [`placements`] chooses them,
//! and every later rendering (servers, launch templates) uses them.
//!
//! Fencing. The old primary is stopped and tagged [`FENCED_TAG`], its names suffixed `-old`:
//! observation leaves fenced servers and volumes out, so `plan` and `up` neither delete nor
//! reuse them, and `down`, which includes them, removes them.

use aws_sdk_ec2::types as ec2;
use rigger_recipes::quote_literal;
use rigger_topology::Role;

use crate::environment::{AwsEnvironment, Network, SELF_ADDRESS, SELF_ID};
use crate::error::{AwsError, Context as _, ErrorKind};
use crate::live::{Live, LiveInstance, ROLES_TAG};
use crate::{Clients, Provider, releases};
use rigger_engine::progress::Progress;

pub use crate::placement::placements;
use crate::placement::short_name;
pub use crate::tags::{FENCED_TAG, SERVER_TAG, is_fenced};

/// What a fenced server's names get appended.
pub const FENCED_SUFFIX: &str = "-old";
/// Where backups go in the environment's bucket.
pub const BACKUP_PREFIX: &str = "backups/";
/// The SSM parameter (under the environment's prefix) that names the replica a failover is
/// promoting, from before anything changes until the failover is done: a failover killed at
/// any point is found by it and finished by the next `rigger db promote`, and `up` waits for
/// that (it would otherwise go on with servers pointing at the fenced primary).
pub const FAILOVER_PARAMETER: &str = "deploy/failover";

/// One database server as AWS shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DbServer {
    /// What one types: `db-primary`, `db-replica1` (its name without `<project>-<env>-`).
    pub name: String,
    /// Its recipe id (certificate, slot, `application_name`): `db-replica1` for a promoted
    /// replica named `db-primary`.
    pub id: String,
    pub instance_id: String,
    /// EC2's state: `running`, `stopped`, ...
    pub state: String,
    pub address: Option<String>,
}

/// The environment's database servers.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Databases {
    pub primary: Option<DbServer>,
    pub replicas: Vec<DbServer>,
    /// Old primaries fenced by failovers, kept stopped until `down`.
    pub fenced: Vec<DbServer>,
}

impl Databases {
    /// The replica called `wanted` (its name, recipe id or instance id), or the first one.
    pub fn replica(&self, wanted: Option<&str>) -> Result<&DbServer, AwsError> {
        let known = || {
            self.replicas
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match wanted {
            None => self.replicas.first().ok_or_else(|| {
                AwsError::precondition(
                    "(database)",
                    "replicas",
                    "the environment has no replica",
                    "`rigger up` builds the replicas that `replicas` under [environments.<env>.database] in rigger.toml asks for (after a promote too)",
                )
            }),
            Some(wanted) => self
                .replicas
                .iter()
                .find(|r| r.name == wanted || r.id == wanted || r.instance_id == wanted)
                .ok_or_else(|| {
                    let is_primary = self
                        .primary
                        .as_ref()
                        .is_some_and(|p| p.name == wanted || p.id == wanted);
                    AwsError::precondition(
                        "(database)",
                        wanted,
                        if is_primary {
                            "it is the primary, not a replica".to_owned()
                        } else {
                            "no replica has this name".to_owned()
                        },
                        if self.replicas.is_empty() {
                            "the environment has no replica; set `replicas` in rigger.toml and run `rigger up`".to_owned()
                        } else {
                            format!("the replicas are: {}", known())
                        },
                    )
                }),
        }
    }
}

fn db_server(env: &AwsEnvironment, instance: &LiveInstance) -> DbServer {
    let name = short_name(env, instance.tags.get("Name").map_or(&instance.id, |n| n));
    DbServer {
        id: instance
            .tags
            .get(SERVER_TAG)
            .cloned()
            .unwrap_or_else(|| name.clone()),
        name,
        instance_id: instance.id.clone(),
        state: instance.state.clone(),
        address: instance.private_address.clone(),
    }
}

/// The database servers in `live`, by their roles tag: the primary (the newest, should an
/// interrupted replacement have left two), the replicas by name, the fenced old primaries.
pub fn databases(env: &AwsEnvironment, live: &Live) -> Databases {
    let mut databases = Databases::default();
    for (_, instances) in live.stand_alone_instances() {
        let Some(instance) = instances.first() else {
            continue;
        };
        let roles = instance.tags.get(ROLES_TAG).map_or("", String::as_str);
        if roles.split(',').any(|r| r == "db-primary") {
            databases.primary.get_or_insert(db_server(env, instance));
        } else if roles.split(',').any(|r| r == "db-replica") {
            databases.replicas.push(db_server(env, instance));
        }
    }
    databases.fenced = live
        .instances
        .values()
        .filter(|i| is_fenced(&i.tags))
        .map(|i| db_server(env, i))
        .collect();
    databases
}

/// Refuses to go on when a failover stopped half-way: the old primary is fenced and no
/// server is the primary yet. `up` would otherwise build an empty primary.
pub fn check_no_failover_interrupted(env: &AwsEnvironment, live: &Live) -> Result<(), AwsError> {
    let databases = databases(env, live);
    if databases.primary.is_none()
        && let Some(fenced) = databases.fenced.first()
    {
        return Err(AwsError::precondition(
            "(database)",
            env.names.server("db-primary"),
            format!(
                "a failover was interrupted: the old primary ({}) is fenced and no server is the primary yet",
                fenced.instance_id
            ),
            "run `rigger db promote` again to finish it",
        ));
    }
    Ok(())
}

/// The `stunnel.conf` of a running web or worker server, rendered as its user-data would
/// render it now (`env` placed: the primary where it is), with the server's own id and
/// address in place of the boot-time placeholders. Returns its path and contents.
pub fn stunnel_conf(
    env: &AwsEnvironment,
    network: &Network,
    role: rigger_recipes::Role,
    release: &str,
    instance_id: &str,
    address: &str,
) -> Result<(std::path::PathBuf, String), AwsError> {
    let ctx = env.context(network, &[role], None, release);
    let recipe = rigger_recipes::render_server(&ctx).map_err(|error| {
        AwsError::precondition(
            "(render)",
            format!("{} server", role.as_str()),
            error.to_string(),
            "this is a bug in rigger's recipes; please report it",
        )
    })?;
    let file = recipe
        .files
        .into_iter()
        .find(|f| f.path.file_name().is_some_and(|n| n == "stunnel.conf") && !f.contains_secret)
        .ok_or_else(|| {
            AwsError::precondition(
                "(render)",
                format!("{} server", role.as_str()),
                "its recipe has no stunnel.conf",
                "this is a bug in rigger's recipes; please report it",
            )
        })?;
    let contents = file
        .contents
        .replace(&SELF_ADDRESS.to_string(), address)
        .replace(SELF_ID, instance_id);
    Ok((file.path, contents))
}

/// SQL run on the new primary after a failover: the replication slot of each replica the
/// next `up` will build (recipe ids from [`placements`]), which its base backup uses
/// without creating it. Idempotent.
pub fn create_slots_sql(replica_ids: &[String]) -> Option<String> {
    if replica_ids.is_empty() {
        return None;
    }
    let values: Vec<String> = replica_ids
        .iter()
        .map(|id| format!("({})", quote_literal(&rigger_recipes::slot_name(id))))
        .collect();
    Some(format!(
        "SELECT pg_create_physical_replication_slot(name) FROM (VALUES {}) AS wanted(name) \
         WHERE name NOT IN (SELECT slot_name FROM pg_replication_slots)",
        values.join(", ")
    ))
}

/// What [`Provider::fail_over`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailedOver {
    /// The fenced old primary's instance, if there was one.
    pub fenced: Option<String>,
    /// The launch templates given a version pointing at the new primary.
    pub templates: Vec<String>,
    /// Recipe ids of the replicas `up` will build next to the new primary.
    pub replicas_to_build: Vec<String>,
    /// Other replicas, which followed the old primary: removed, `up` rebuilds them.
    pub replicas_removed: Vec<String>,
}

fn tag(key: &str, value: &str) -> ec2::Tag {
    ec2::Tag::builder().key(key).value(value).build()
}

impl Provider {
    /// The instance id of the replica an unfinished failover was promoting, if one was cut
    /// off ([`FAILOVER_PARAMETER`]).
    pub async fn unfinished_failover(&self) -> Result<Option<String>, AwsError> {
        crate::parameters::get(&self.clients, &self.env.parameter(FAILOVER_PARAMETER)).await
    }

    /// Records that a failover promoting `instance_id` begins (before anything changes).
    pub async fn begin_failover(&self, instance_id: &str) -> Result<(), AwsError> {
        crate::parameters::put(
            &self.clients,
            &self.env.parameter(FAILOVER_PARAMETER),
            instance_id,
        )
        .await
    }

    /// Records that the failover is done: every step of it ran.
    pub async fn end_failover(&self) -> Result<(), AwsError> {
        crate::parameters::delete(&self.clients, &self.env.parameter(FAILOVER_PARAMETER)).await
    }

    /// Refuses to go on while a failover is unfinished: recorded and not ended, or the old
    /// primary fenced with none in its place.
    pub async fn check_no_failover_interrupted(&self, live: &Live) -> Result<(), AwsError> {
        if let Some(promoting) = self.unfinished_failover().await? {
            return Err(AwsError::precondition(
                "(database)",
                self.env.parameter(FAILOVER_PARAMETER),
                format!("a failover promoting {promoting} was interrupted before it finished"),
                "run `rigger db promote` again to finish it",
            ));
        }
        check_no_failover_interrupted(&self.env, live)
    }

    /// The environment's database servers.
    pub async fn databases(&self) -> Result<Databases, AwsError> {
        let live = Live::read(&self.env, &self.clients).await?;
        Ok(databases(&self.env, &live))
    }

    async fn retag(&self, resource: &str, what: &str, tags: Vec<ec2::Tag>) -> Result<(), AwsError> {
        self.clients
            .ec2
            .create_tags()
            .resources(resource)
            .set_tags(Some(tags))
            .send()
            .await
            .op("CreateTags", what)?;
        Ok(())
    }

    /// Gives an instance, its data volume and its network interface the names of server
    /// `name` (`<project>-<env>-<name>`), its recipe id kept in [`SERVER_TAG`].
    async fn rename_server(
        &self,
        live: &Live,
        instance: &LiveInstance,
        recipe_id: &str,
        name: &str,
        roles: &str,
        fenced: Option<&str>,
    ) -> Result<(), AwsError> {
        let full = self.env.names.server(name);
        let mut extra = Vec::new();
        match fenced {
            Some(when) => extra.push(tag(FENCED_TAG, when)),
            // The topology's role tag, on the instance and its volume, as `up` tags them.
            None => extra.push(tag(rigger_topology::tag::ROLE, Role::DbPrimary.as_str())),
        }
        // Fenced first (it then no longer counts as a primary), named last.
        let mut tags = extra.clone();
        tags.extend([tag(SERVER_TAG, recipe_id), tag(ROLES_TAG, roles)]);
        self.retag(&instance.id, &full, tags).await?;
        for volume in live
            .volumes
            .iter()
            .filter(|v| v.attached_to.as_deref() == Some(instance.id.as_str()))
        {
            let mut tags = extra.clone();
            tags.push(tag("Name", &self.env.names.volume(&full)));
            self.retag(&volume.id, &full, tags).await?;
        }
        if let Some(interface) = &instance.primary_interface {
            let mut tags = extra.clone();
            tags.extend([
                tag("Name", &crate::live::interface_name(&full)),
                tag(SERVER_TAG, recipe_id),
            ]);
            self.retag(interface, &full, tags).await?;
        }
        self.retag(&instance.id, &full, vec![tag("Name", &full)])
            .await
    }

    /// The AWS half of a failover, once `replica` (an instance id) runs as the primary:
    /// fences the old primary (tagged, stopped, renamed `-old`), gives the replica the
    /// primary's names, removes the other replicas (they followed the old primary; `up`
    /// rebuilds them), and gives the launch templates a version whose servers boot pointing
    /// at the new primary. Every step may be repeated: a re-run after an interruption
    /// finishes the job.
    pub async fn fail_over(
        &self,
        replica: &str,
        report: &dyn Progress,
    ) -> Result<FailedOver, AwsError> {
        let (network, live) = self.observe().await?;
        let mut done = FailedOver::default();
        let promoted = live.instances.get(replica).cloned().ok_or_else(|| {
            AwsError::precondition(
                "(database)",
                replica,
                "no instance of the environment has this id",
                "`rigger db status` lists the database servers",
            )
        })?;
        let promoted_server = db_server(&self.env, &promoted);
        let current = databases(&self.env, &live);
        if let Some(old) = current
            .primary
            .as_ref()
            .filter(|p| p.instance_id != promoted.id)
            && let Some(instance) = live.instances.get(&old.instance_id)
        {
            report.report(&format!(
                "fencing the old primary {} ({}): stopped, renamed db-primary{FENCED_SUFFIX}",
                old.name, old.instance_id
            ));
            let when = rigger_engine::clock::unix_now().to_string();
            self.rename_server(
                &live,
                instance,
                &old.id,
                &format!("db-primary{FENCED_SUFFIX}"),
                "db-fenced",
                Some(&when),
            )
            .await?;
            // Forced: the primary may be unreachable, and it must stop whatever it is doing.
            self.clients
                .ec2
                .stop_instances()
                .instance_ids(&instance.id)
                .force(true)
                .send()
                .await
                .op("StopInstances", &old.name)?;
            done.fenced = Some(instance.id.clone());
        }
        report.report(&format!(
            "{} ({}) is now named db-primary",
            promoted_server.name, promoted_server.id
        ));
        self.rename_server(
            &live,
            &promoted,
            &promoted_server.id,
            "db-primary",
            "db-primary",
            None,
        )
        .await?;
        for other in current
            .replicas
            .iter()
            .filter(|r| r.instance_id != promoted.id)
        {
            report.report(&format!(
                "removing replica {} (it followed the old primary); `rigger up` rebuilds it",
                other.name
            ));
            self.remove_replica(&live, &other.name).await?;
            done.replicas_removed.push(other.name.clone());
        }
        let (_, live) = self.observe().await?;
        let release = self
            .current_release(&live)
            .unwrap_or_else(|| "initial".to_owned());
        let topology = self
            .desired(&live, &release)
            .map_err(crate::topology_error)?;
        done.templates = crate::apply::rewrite_launch_templates(
            &self.env,
            &self.clients,
            &network,
            &live,
            &topology,
            report,
        )
        .await?;
        if self.env.aws().launch == rigger_config::LaunchKind::Configuration {
            report.report(
                "warning: launch configurations cannot be changed: servers the groups launch boot pointing at the old primary until the next deploy",
            );
        }
        let placed = self
            .env
            .with_placements(placements(&self.env, &network, &live));
        done.replicas_to_build = placed
            .stand_alone_servers(&network)
            .into_iter()
            .filter(|s| s.role == Role::DbReplica && live.server(&s.name).is_none())
            .map(|s| s.id)
            .collect();
        Ok(done)
    }

    /// Terminates replica `name`'s instance and deletes its data volume, keeping its network
    /// interface (so its address and recipe id, whose replication slot the primary keeps):
    /// the next `up` creates it again, and it boots with a fresh base backup of the primary.
    /// Either part may already be done (an interrupted run).
    pub async fn prepare_reseed(&self, name: &str, report: &dyn Progress) -> Result<(), AwsError> {
        let live = Live::read(&self.env, &self.clients).await?;
        let configured =
            (1..=self.env.env().database.replicas).any(|n| format!("db-replica{n}") == name);
        let databases = databases(&self.env, &live);
        if !configured && !databases.replicas.iter().any(|r| r.name == name) {
            // The same error as for an unknown replica.
            databases.replica(Some(name))?;
        }
        report.report(&format!("removing replica {name} and its data volume"));
        self.remove_replica(&live, name).await
    }

    async fn remove_replica(&self, live: &Live, name: &str) -> Result<(), AwsError> {
        let full = self.env.names.server(name);
        let waits = self.waits;
        if let Some(instance) = live.server(&full) {
            self.clients
                .ec2
                .terminate_instances()
                .instance_ids(&instance.id)
                .send()
                .await
                .op("TerminateInstances", &full)?;
            let id = instance.id.clone();
            wait(waits, &format!("{full} to terminate"), || async {
                Ok(instance_state(&self.clients, &id, &full)
                    .await?
                    .as_deref()
                    .is_none_or(|s| s == "terminated"))
            })
            .await?;
        }
        if let Some(volume) = live.volume(&self.env.names.volume(&full)) {
            let id = volume.id.clone();
            let what = self.env.names.volume(&full);
            wait(waits, &format!("{what} to be deleted"), || async {
                match self
                    .clients
                    .ec2
                    .delete_volume()
                    .volume_id(&id)
                    .send()
                    .await
                    .op("DeleteVolume", &what)
                {
                    Ok(_) => Ok(true),
                    Err(error) if error.kind() == ErrorKind::NotFound => Ok(true),
                    // Still detaching from the terminated instance.
                    Err(error) if error.code() == Some("VolumeInUse") => Ok(false),
                    Err(error) => Err(error),
                }
            })
            .await?;
        }
        Ok(())
    }

    /// The environment's bucket, or an error saying to run `up`.
    pub async fn bucket(&self) -> Result<String, AwsError> {
        releases::find(&self.env, &self.clients)
            .await?
            .ok_or_else(|| {
                AwsError::precondition(
                    "(backups)",
                    self.env.parameter(releases::BUCKET_PARAMETER),
                    "the environment has no bucket yet",
                    "run `rigger up` first",
                )
            })
    }
}

async fn instance_state(
    clients: &Clients,
    id: &str,
    what: &str,
) -> Result<Option<String>, AwsError> {
    match clients
        .ec2
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .op("DescribeInstances", what)
    {
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error),
        Ok(answer) => Ok(answer
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .next()
            .and_then(|i| i.state())
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_owned())),
    }
}

async fn wait<F, Fut>(waits: crate::Waits, what: &str, mut check: F) -> Result<(), AwsError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, AwsError>>,
{
    let started = std::time::Instant::now();
    loop {
        if check().await? {
            return Ok(());
        }
        if started.elapsed() > waits.timeout {
            return Err(AwsError::Timeout {
                what: what.to_owned(),
                seconds: waits.timeout.as_secs(),
            });
        }
        tokio::time::sleep(waits.poll).await;
    }
}

/// The object key of backup `name`.
pub fn backup_key(name: &str) -> String {
    format!("{BACKUP_PREFIX}{name}")
}

/// Backup names in `bucket`, oldest first. Partial uploads (`.partial`) are not backups.
pub async fn list_backups(clients: &Clients, bucket: &str) -> Result<Vec<String>, AwsError> {
    let mut names = Vec::new();
    let mut pages = clients
        .s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(BACKUP_PREFIX)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.op("ListObjectsV2", format!("s3://{bucket}/{BACKUP_PREFIX}"))?;
        names.extend(page.contents().iter().filter_map(|o| {
            let name = o.key()?.strip_prefix(BACKUP_PREFIX)?;
            rigger_engine::backups::is_backup_name(name).then(|| name.to_owned())
        }));
    }
    names.sort();
    Ok(names)
}

/// Deletes all but the newest `keep` backups (at least one is kept); returns the names
/// deleted.
pub async fn prune_backups(
    clients: &Clients,
    bucket: &str,
    keep: usize,
) -> Result<Vec<String>, AwsError> {
    let names = list_backups(clients, bucket).await?;
    let mut deleted = Vec::new();
    for name in rigger_engine::backups::to_prune(&names, keep) {
        let key = backup_key(&name);
        clients
            .s3
            .delete_object()
            .bucket(bucket)
            .key(&key)
            .send()
            .await
            .op("DeleteObject", format!("s3://{bucket}/{key}"))?;
        deleted.push(name);
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    use crate::environment::Placement;
    use crate::environment::{Cidr, Subnet};
    use crate::live::{LiveInstance, LiveInterface};
    use crate::tags::Tags;

    fn env(replicas: u32) -> AwsEnvironment {
        let text = format!(
            r#"
[project]
name = "shop"
app_path = "."
wsgi_module = "shop.wsgi:application"
celery_app = "shop"
domains = ["shop.example.com"]

[environments.prod]
provider = "aws"
region = "us-east-1"
ami = "ami-12345678"
certificate = "arn:aws:iam::123456789012:server-certificate/x"

[environments.prod.database]
replicas = {replicas}
"#
        );
        let config = rigger_config::parse(&text, "rigger.toml").unwrap();
        AwsEnvironment::new(config, "prod").unwrap()
    }

    fn network() -> Network {
        Network {
            vpc_id: "vpc-1".into(),
            vpc_cidr: "172.31.0.0/16".parse::<Cidr>().unwrap(),
            subnets: vec![
                Subnet {
                    id: "subnet-a".into(),
                    zone: "us-east-1a".into(),
                    cidr: "172.31.0.0/20".parse::<Cidr>().unwrap(),
                },
                Subnet {
                    id: "subnet-b".into(),
                    zone: "us-east-1b".into(),
                    cidr: "172.31.16.0/20".parse::<Cidr>().unwrap(),
                },
            ],
        }
    }

    fn instance(
        id: &str,
        name: &str,
        roles: &str,
        address: &str,
        extra: &[(&str, &str)],
    ) -> LiveInstance {
        let mut tags: Tags = [("Name", name), (ROLES_TAG, roles)]
            .iter()
            .chain(extra)
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        tags.insert("project".into(), "shop".into());
        LiveInstance {
            id: id.into(),
            state: "running".into(),
            private_address: Some(address.into()),
            tags,
            ..LiveInstance::default()
        }
    }

    fn live(instances: Vec<LiveInstance>) -> Live {
        let mut live = Live::default();
        for i in instances {
            live.instances.insert(i.id.clone(), i);
        }
        live
    }

    /// The configured addresses: cache .15.244, db-primary .15.243, db-replica1 (zone b) .31.242.
    fn configured(env: &AwsEnvironment) -> Vec<(String, String, Ipv4Addr)> {
        env.stand_alone_servers(&network())
            .into_iter()
            .map(|s| (s.name, s.id, s.address))
            .collect()
    }

    #[test]
    fn nothing_moves_until_a_failover() {
        let env = env(1);
        let defaults = configured(&env);
        let live = live(
            defaults
                .iter()
                .map(|(name, _, address)| {
                    instance(&format!("i-{name}"), name, "x", &address.to_string(), &[])
                })
                .collect(),
        );
        assert_eq!(placements(&env, &network(), &live), BTreeMap::new());
    }

    #[test]
    fn after_a_failover_the_primary_is_the_promoted_replica_and_a_new_replica_gets_free_names() {
        let env = env(1);
        let defaults = configured(&env);
        assert_eq!(
            defaults
                .iter()
                .map(|(n, i, a)| format!("{n} {i} {a}"))
                .collect::<Vec<_>>(),
            [
                "shop-prod-cache cache 172.31.15.244",
                "shop-prod-db-primary db-primary 172.31.15.243",
                "shop-prod-db-replica1 db-replica1 172.31.31.242",
            ]
        );
        let mut fenced = instance(
            "i-old",
            "shop-prod-db-primary-old",
            "db-fenced",
            "172.31.15.243",
            &[(SERVER_TAG, "db-primary"), (FENCED_TAG, "1")],
        );
        fenced.state = "stopped".into();
        let mut live = live(vec![
            instance(
                "i-cache",
                "shop-prod-cache",
                "cache,queue",
                "172.31.15.244",
                &[],
            ),
            instance(
                "i-new",
                "shop-prod-db-primary",
                "db-primary",
                "172.31.31.242",
                &[(SERVER_TAG, "db-replica1")],
            ),
            fenced,
        ]);
        live.interfaces.push(LiveInterface {
            name: "shop-prod-db-primary-old-eni".into(),
            private_address: Some("172.31.15.243".into()),
            tags: [(SERVER_TAG.to_owned(), "db-primary".to_owned())].into(),
            ..LiveInterface::default()
        });
        let placed = placements(&env, &network(), &live);
        assert_eq!(
            placed,
            BTreeMap::from([
                (
                    "shop-prod-db-primary".to_owned(),
                    Placement {
                        id: "db-replica1".into(),
                        address: "172.31.31.242".parse().unwrap()
                    }
                ),
                (
                    // db-replica1 and its address are the primary's now: the next free ones,
                    // below the block of three.
                    "shop-prod-db-replica1".to_owned(),
                    Placement {
                        id: "db-replica2".into(),
                        address: "172.31.31.241".parse().unwrap()
                    }
                ),
            ])
        );
        // Rendered with them, a web server's stunnel connects to the promoted server and
        // checks the name its certificate carries.
        let placed_env = env.with_placements(placed);
        let (path, conf) = stunnel_conf(
            &placed_env,
            &network(),
            rigger_recipes::Role::Web,
            "r1",
            "i-web1",
            "172.31.0.10",
        )
        .unwrap();
        assert!(path.ends_with("stunnel.conf"), "{path:?}");
        let primary_section = conf.split("\n[").nth(1).unwrap();
        assert!(primary_section.starts_with("shop]"), "{primary_section}");
        assert!(
            primary_section.contains("connect = 172.31.31.242:5432"),
            "{conf}"
        );
        assert!(
            primary_section.contains("checkHost = db-replica1"),
            "{conf}"
        );
        assert!(conf.contains("accept = 172.31.0.10:"), "{conf}");
        assert!(conf.contains("i-web1") && !conf.contains(SELF_ID), "{conf}");
        assert!(!conf.contains(&SELF_ADDRESS.to_string()), "{conf}");
        let replica_section = conf.split("\n[").nth(2).unwrap();
        assert!(
            replica_section.contains("connect = 172.31.31.241:5432"),
            "{conf}"
        );
        assert!(
            replica_section.contains("checkHost = db-replica2"),
            "{conf}"
        );
    }

    #[test]
    fn databases_are_found_by_their_roles_and_replicas_by_any_of_their_names() {
        let env = env(2);
        let mut fenced = instance(
            "i-old",
            "shop-prod-db-primary-old",
            "db-fenced",
            "10.0.0.1",
            &[(FENCED_TAG, "1")],
        );
        fenced.state = "stopped".into();
        let live = live(vec![
            instance(
                "i-p",
                "shop-prod-db-primary",
                "db-primary",
                "10.0.0.2",
                &[(SERVER_TAG, "db-replica1")],
            ),
            instance(
                "i-r2",
                "shop-prod-db-replica2",
                "db-replica",
                "10.0.0.3",
                &[],
            ),
            instance("i-c", "shop-prod-cache", "cache,queue", "10.0.0.4", &[]),
            fenced,
        ]);
        let found = databases(&env, &live);
        let primary = found.primary.as_ref().unwrap();
        assert_eq!(
            (primary.name.as_str(), primary.id.as_str()),
            ("db-primary", "db-replica1")
        );
        assert_eq!(found.replicas.len(), 1);
        assert_eq!(found.fenced[0].instance_id, "i-old");
        for name in ["db-replica2", "i-r2"] {
            assert_eq!(found.replica(Some(name)).unwrap().instance_id, "i-r2");
        }
        assert_eq!(found.replica(None).unwrap().instance_id, "i-r2");
        let unknown = found.replica(Some("db-replica9")).unwrap_err().to_string();
        assert!(
            unknown.contains("db-replica9") && unknown.contains("the replicas are: db-replica2"),
            "{unknown}"
        );
        let primary = found.replica(Some("db-primary")).unwrap_err().to_string();
        assert!(primary.contains("it is the primary"), "{primary}");
        let none = Databases::default().replica(None).unwrap_err().to_string();
        assert!(
            none.contains("no replica") && none.contains("replicas"),
            "{none}"
        );
        // A half-done failover stops `up`.
        let mut interrupted = live.clone();
        interrupted.instances.remove("i-p");
        let error = check_no_failover_interrupted(&env, &interrupted)
            .unwrap_err()
            .to_string();
        assert!(error.contains("rigger db promote"), "{error}");
        assert!(check_no_failover_interrupted(&env, &live).is_ok());
    }

    #[test]
    fn slots_sql_creates_only_missing_slots() {
        assert_eq!(create_slots_sql(&[]), None);
        assert_eq!(
            create_slots_sql(&["db-replica2".into()]).unwrap(),
            "SELECT pg_create_physical_replication_slot(name) FROM (VALUES ('rigger_db_replica2')) AS wanted(name) \
             WHERE name NOT IN (SELECT slot_name FROM pg_replication_slots)"
        );
    }
}
