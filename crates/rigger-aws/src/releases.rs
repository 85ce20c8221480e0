//! The environment's releases bucket: `<project>-<env>-releases-<random suffix>` in S3,
//! made by `up` (tagged with the environment, versioning on, public access blocked), holding
//! one gzipped tarball per release at `releases/<id>.tar.gz`. Its name is recorded in SSM at
//! `/<project>/<env>/deploy/bucket`, which is how rigger finds it again and how a server's
//! user-data finds it at boot (the instance profile may read the environment's parameters and
//! `s3:GetObject` in buckets named `<project>-<env>-releases-*`).
//!
//! Every release a server launches with is there first: a deploy uploads its own, and the
//! first `up` uploads the first release ([`INITIAL_RELEASE`]) before it creates the groups
//! ([`crate::Provider::first_release_missing`], [`crate::Provider::upload_first_release`]),
//! so web and worker servers boot with the app.

use std::path::Path;

use aws_sdk_s3::types::{
    BucketVersioningStatus, CreateBucketConfiguration, PublicAccessBlockConfiguration, Tag,
    Tagging, VersioningConfiguration,
};
use aws_sdk_ssm::types::ParameterType;
use rigger_topology::tag;

use crate::Clients;
use crate::environment::AwsEnvironment;
use crate::error::{AwsError, Context as _, ErrorKind};
use rigger_engine::progress::Progress;

/// The SSM parameter (under the environment's prefix) naming the bucket.
pub const BUCKET_PARAMETER: &str = "deploy/bucket";

/// The release the first `up` launches the groups with, before any deploy: the app at git
/// `HEAD` when `up` ran, uploaded once (never replaced: servers may already run it). Named as
/// the local provider's first release. Its servers run its
/// migrations at boot ([`crate::userdata`]): there is no earlier release to keep serving.
pub use rigger_plan::deploys::INITIAL_RELEASE;

/// Where a release's wheels are, relative to its top: one for every requirement, built on the
/// operator's machine, so servers install the app with `pip install --no-index --find-links`
/// and never need PyPI.
pub const WHEELS: &str = "wheels";

/// The Python the servers run (Debian 12's, on x86_64): what the wheels a release carries
/// must suit. rigger builds them with the operator's `/usr/bin/python3` and refuses one that
/// differs (another minor version, architecture, implementation, or a newer C library).
pub const SERVER_PYTHON: &str = "3.11";
/// The servers' architecture (`platform.machine()`): rigger's AMIs are Debian 12's amd64.
pub const SERVER_MACHINE: &str = "x86_64";
/// Debian 12's glibc: wheels needing a newer one would not install on the servers.
pub const SERVER_GLIBC: (u32, u32) = (2, 36);
/// What runs the servers, as error messages name it.
pub const SERVER_SYSTEM: &str = "Debian 12";

/// The object key of release `id`.
pub fn object_key(id: &str) -> String {
    format!("releases/{id}.tar.gz")
}

/// `<project>-<env>-releases-`: every bucket of the environment starts so (the instance
/// profile's `s3:GetObject` is scoped to it).
pub fn bucket_prefix(project: &str, environment: &str) -> String {
    format!("{project}-{environment}-releases-").to_ascii_lowercase()
}

/// The bucket's name, when `up` made one.
pub async fn find(env: &AwsEnvironment, clients: &Clients) -> Result<Option<String>, AwsError> {
    let name = env.parameter(BUCKET_PARAMETER);
    match clients
        .ssm
        .get_parameter()
        .name(&name)
        .send()
        .await
        .op("GetParameter", &name)
    {
        Ok(answer) => Ok(answer
            .parameter()
            .and_then(|p| p.value())
            .map(str::to_owned)),
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(None),
        Err(error) if error.code() == Some("ParameterNotFound") => Ok(None),
        Err(error) => Err(error),
    }
}

/// Makes the bucket when the environment has none; returns its name.
pub async fn ensure(
    env: &AwsEnvironment,
    clients: &Clients,
    report: &dyn Progress,
) -> Result<String, AwsError> {
    if let Some(bucket) = find(env, clients).await? {
        return Ok(bucket);
    }
    let mut bucket = bucket_prefix(env.project(), &env.name);
    bucket.push_str(&random_suffix()?);
    bucket.truncate(63);
    report.report(&format!("creating bucket {bucket} for releases"));
    let mut create = clients.s3.create_bucket().bucket(&bucket);
    if env.aws().region != "us-east-1" {
        create = create.create_bucket_configuration(
            CreateBucketConfiguration::builder()
                .location_constraint(env.aws().region.as_str().into())
                .build(),
        );
    }
    create.send().await.op("CreateBucket", &bucket)?;
    let tags = [
        (tag::PROJECT, env.project()),
        (tag::ENVIRONMENT, env.name.as_str()),
        ("Name", bucket.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| Tag::builder().key(k).value(v).build())
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| AwsError::precondition("PutBucketTagging", &bucket, e.to_string(), "a bug"))?;
    clients
        .s3
        .put_bucket_tagging()
        .bucket(&bucket)
        .tagging(
            Tagging::builder()
                .set_tag_set(Some(tags))
                .build()
                .map_err(|e| {
                    AwsError::precondition("PutBucketTagging", &bucket, e.to_string(), "a bug")
                })?,
        )
        .send()
        .await
        .op("PutBucketTagging", &bucket)?;
    clients
        .s3
        .put_bucket_versioning()
        .bucket(&bucket)
        .versioning_configuration(
            VersioningConfiguration::builder()
                .status(BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .op("PutBucketVersioning", &bucket)?;
    clients
        .s3
        .put_public_access_block()
        .bucket(&bucket)
        .public_access_block_configuration(
            PublicAccessBlockConfiguration::builder()
                .block_public_acls(true)
                .ignore_public_acls(true)
                .block_public_policy(true)
                .restrict_public_buckets(true)
                .build(),
        )
        .send()
        .await
        .op("PutPublicAccessBlock", &bucket)?;
    // Created only if missing: of two runs making the environment's first bucket at once,
    // one records its own; the other deletes its (empty) bucket and uses that one, so the
    // releases, the backups and the deploy lock ([`crate::lock`]) live in a single bucket.
    let parameter = env.parameter(BUCKET_PARAMETER);
    match clients
        .ssm
        .put_parameter()
        .name(&parameter)
        .value(&bucket)
        .r#type(ParameterType::String)
        .overwrite(false)
        .send()
        .await
        .op("PutParameter", &parameter)
    {
        Ok(_) => Ok(bucket),
        Err(error) if error.code() == Some("ParameterAlreadyExists") => {
            clients
                .s3
                .delete_bucket()
                .bucket(&bucket)
                .send()
                .await
                .op("DeleteBucket", &bucket)?;
            find(env, clients).await?.ok_or_else(|| {
                AwsError::precondition(
                    "GetParameter",
                    &parameter,
                    "another run recorded the environment's bucket, then it was deleted",
                    "run the command again",
                )
            })
        }
        Err(error) => Err(error),
    }
}

/// Uploads the tarball of release `id`.
pub async fn upload(
    clients: &Clients,
    bucket: &str,
    id: &str,
    tarball: &Path,
) -> Result<(), AwsError> {
    put(clients, bucket, id, tarball, false).await.map(|_| ())
}

/// Uploads the tarball of release `id` unless the bucket has it already (a conditional
/// `PutObject`, `If-None-Match: *`, so two runs cannot both write it). Returns whether this
/// call uploaded it.
pub async fn upload_once(
    clients: &Clients,
    bucket: &str,
    id: &str,
    tarball: &Path,
) -> Result<bool, AwsError> {
    put(clients, bucket, id, tarball, true).await
}

/// `PutObject` of release `id`'s tarball; `only_if_absent`: conditional, `false` when the
/// object was there already.
async fn put(
    clients: &Clients,
    bucket: &str,
    id: &str,
    tarball: &Path,
    only_if_absent: bool,
) -> Result<bool, AwsError> {
    let key = object_key(id);
    let body = aws_sdk_s3::primitives::ByteStream::from_path(tarball)
        .await
        .map_err(|e| {
            AwsError::precondition(
                "PutObject",
                format!("s3://{bucket}/{key}"),
                format!("reading {}: {e}", tarball.display()),
                "check that the release was built",
            )
        })?;
    let mut request = clients.s3.put_object().bucket(bucket).key(&key).body(body);
    if only_if_absent {
        request = request.if_none_match("*");
    }
    match request
        .send()
        .await
        .op("PutObject", format!("s3://{bucket}/{key}"))
    {
        Ok(_) => Ok(true),
        Err(error)
            if only_if_absent
                && matches!(
                    error.code(),
                    Some("PreconditionFailed" | "ConditionalRequestConflict")
                ) =>
        {
            Ok(false)
        }
        Err(error) => Err(error),
    }
}

/// Whether release `id` is in the bucket.
pub async fn exists(clients: &Clients, bucket: &str, id: &str) -> Result<bool, AwsError> {
    let key = object_key(id);
    match clients
        .s3
        .head_object()
        .bucket(bucket)
        .key(&key)
        .send()
        .await
        .op("HeadObject", format!("s3://{bucket}/{key}"))
    {
        Ok(_) => Ok(true),
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(false),
        Err(error) if matches!(error.code(), Some("NotFound" | "NoSuchKey" | "404")) => Ok(false),
        Err(error) => Err(error),
    }
}

impl crate::Provider {
    /// Whether `up` must upload the first release ([`INITIAL_RELEASE`]) before it launches anything:
    /// the groups do not exist yet (or run the first release, made by an earlier `up` that
    /// uploaded nothing), and the bucket lacks it. A few calls, so that `up` builds the
    /// release only when it needs it.
    pub async fn first_release_missing(&self) -> Result<bool, AwsError> {
        let group = self.env.names.group(rigger_topology::Role::Web);
        let groups = self
            .clients
            .autoscaling
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(&group)
            .send()
            .await
            .op("DescribeAutoScalingGroups", &group)?;
        if let Some(group) = groups.auto_scaling_groups().first() {
            let release = self.release_launched_by(
                group
                    .launch_template()
                    .and_then(|t| t.launch_template_name()),
                group.launch_configuration_name(),
            );
            if release.as_deref() != Some(INITIAL_RELEASE) {
                return Ok(false);
            }
        }
        match find(&self.env, &self.clients).await? {
            Some(bucket) => Ok(!exists(&self.clients, &bucket, INITIAL_RELEASE).await?),
            None => Ok(true),
        }
    }

    /// Uploads `artifact` as the first release ([`INITIAL_RELEASE`], whatever its id), into the
    /// environment's bucket (made if missing), unless the bucket has one already.
    pub async fn upload_first_release(
        &self,
        artifact: &Artifact,
        report: &dyn Progress,
    ) -> Result<(), AwsError> {
        let bucket = ensure(&self.env, &self.clients, report).await?;
        if upload_once(&self.clients, &bucket, INITIAL_RELEASE, &artifact.tarball).await? {
            report.report(&format!(
                "uploaded the first release ({}) to s3://{bucket}/{}",
                artifact.revision,
                object_key(INITIAL_RELEASE)
            ));
        }
        Ok(())
    }
}

/// Eight bytes from the system's random source (a bucket's suffix, a deploy lock's id).
pub(crate) fn random_bytes() -> Result<[u8; 8], AwsError> {
    use std::io::Read as _;
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| {
            AwsError::precondition(
                "(random)",
                "/dev/urandom",
                e.to_string(),
                "rigger needs /dev/urandom",
            )
        })?;
    Ok(bytes)
}

/// Deletes every version of every object, then the bucket and its parameter (`down`).
pub async fn delete(env: &AwsEnvironment, clients: &Clients, bucket: &str) -> Result<(), AwsError> {
    loop {
        let listed = clients
            .s3
            .list_object_versions()
            .bucket(bucket)
            .send()
            .await
            .op("ListObjectVersions", bucket)?;
        let mut objects: Vec<(String, Option<String>)> = listed
            .versions()
            .iter()
            .filter_map(|v| Some((v.key()?.to_owned(), v.version_id().map(str::to_owned))))
            .collect();
        objects.extend(
            listed
                .delete_markers()
                .iter()
                .filter_map(|m| Some((m.key()?.to_owned(), m.version_id().map(str::to_owned)))),
        );
        if objects.is_empty() {
            break;
        }
        for (key, version) in objects {
            clients
                .s3
                .delete_object()
                .bucket(bucket)
                .key(&key)
                .set_version_id(version)
                .send()
                .await
                .op("DeleteObject", format!("s3://{bucket}/{key}"))?;
        }
    }
    clients
        .s3
        .delete_bucket()
        .bucket(bucket)
        .send()
        .await
        .op("DeleteBucket", bucket)?;
    let parameter = env.parameter(BUCKET_PARAMETER);
    clients
        .ssm
        .delete_parameter()
        .name(&parameter)
        .send()
        .await
        .op("DeleteParameter", &parameter)?;
    Ok(())
}

/// Eight random lowercase letters and digits (bucket names are global).
fn random_suffix() -> Result<String, AwsError> {
    let bytes = random_bytes()?;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    Ok(bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect())
}

/// A built release, ready to upload.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// `<UTC timestamp>-<short sha>`.
    pub id: String,
    pub revision: String,
    /// The gzipped tarball of the app's tree.
    pub tarball: std::path::PathBuf,
}
