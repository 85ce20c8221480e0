//! Baked images: `rigger image build -e ENV` makes an AMI holding every role's Debian packages,
//! so servers launched from it install nothing at boot (production servers need not reach the
//! package archive, and boot faster).
//!
//! A build launches one builder instance from the environment's base AMI (rigger.toml's
//! `ami`) in its first subnet, with a security group of its own that admits nothing, no key
//! pair and no instance profile, and the user-data of [`builder_script`]: it installs
//! [`crate::userdata::boot_packages`] with the boot script's own `install_packages` (Debian's
//! daemons kept from starting), disables Debian's units for the programs rigger runs under its
//! own units and masks its epmd (as every boot script does), removes what each instance makes
//! its own (SSH host keys, machine id, cloud-init's per-instance state, apt's lists and
//! cache), writes the end of its log and its outcome to the console, and powers off
//! (instance-initiated shutdown behaviour `stop`). rigger waits for the instance to stop, reads
//! the outcome from its console output (`GetConsoleOutput`: no credentials on the builder, no
//! IAM to clean up; a failure is reported with the builder's log), makes the image
//! (`CreateImage`), waits until it is `available`, and records it in SSM
//! (`/<project>/<env>/image`, [`RecordedImage`]). From then on the environment's launch
//! templates and new servers use it ([`choose`], [`use_image`]); no running server is replaced
//! because an image was baked.
//!
//! The image is tagged with the project, the environment, its base and its packages hash
//! ([`packages_hash`]: the base AMI and the builder script): a build whose hash has an
//! available image already reuses it, unless forced. The builder and its security group are
//! tagged [`BUILDER_TAG`] = `<project>/<env>` (never the environment's own tags, so plans do not
//! see them) and removed on every path: after the image, after a failure, on Ctrl-C (the CLI
//! calls [`clean_up`]), and at the start of the next build for a run that was killed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types as ec2;
use base64::Engine as _;
use rigger_plan::Observed;
use rigger_topology::{ResourceKind, Topology, Value};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::Clients;
use crate::environment::{AwsEnvironment, Network};
use crate::error::{AwsError, Context as _};
use rigger_engine::progress::Progress;

/// The tag marking a builder instance and its security group: `<project>/<env>`.
pub const BUILDER_TAG: &str = "rigger:image-builder";
/// The baked image's packages hash ([`packages_hash`]).
pub const PACKAGES_HASH_TAG: &str = "rigger:packages-hash";
/// The AMI the baked image was built from.
pub const BASE_TAG: &str = "rigger:base-image";
/// The SSM parameter (under the environment's prefix) recording the baked image.
pub const PARAMETER: &str = "image";
/// How the builder's outcome line starts on its console.
pub const OUTCOME_MARKER: &str = "rigger-image-build:";
/// Where the builder keeps its whole log (in the image too).
pub const BUILDER_LOG: &str = "/var/log/rigger-image-build.log";
/// Lines of the builder's log it writes to the console.
const CONSOLE_TAIL_LINES: usize = 60;

/// The image `rigger image build` recorded for an environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedImage {
    /// The baked AMI.
    pub ami: String,
    /// The AMI it was built from (rigger.toml's `ami` at the time).
    pub base: String,
    /// [`packages_hash`] of the build.
    pub packages_hash: String,
    /// The AMI's name.
    pub name: String,
}

/// The image servers of the environment launch from, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageChoice {
    /// The AMI launch templates and new servers use.
    pub ami: String,
    /// rigger.toml's `ami`.
    pub base: String,
    /// The baked image in use, when there is one for `base`.
    pub baked: Option<RecordedImage>,
    /// A recorded image that was built from another base: not used.
    pub stale: Option<RecordedImage>,
}

impl ImageChoice {
    /// One line for `rigger plan` and `rigger image build`.
    pub fn describe(&self, environment: &str) -> String {
        match (&self.baked, &self.stale) {
            (Some(baked), _) => format!(
                "image: {} (baked by `rigger image build` from {}, packages {})",
                baked.ami,
                baked.base,
                &baked.packages_hash[..12.min(baked.packages_hash.len())]
            ),
            (None, Some(stale)) => format!(
                "image: {} (rigger.toml's ami; the baked image {} was built from {}: \
                 `rigger image build -e {environment}` bakes one from {})",
                self.ami, stale.ami, stale.base, self.base
            ),
            (None, None) => format!(
                "image: {} (rigger.toml's ami, not baked: servers install their packages at \
                 boot; `rigger image build -e {environment}` bakes them in)",
                self.ami
            ),
        }
    }
}

/// The image to launch from: the recorded baked image when it was built from rigger.toml's
/// `ami`, else `ami` itself (a changed `ami` makes the baked image stale, never silently used).
pub fn choose(base: &str, recorded: Option<&RecordedImage>) -> ImageChoice {
    match recorded {
        Some(image) if image.base == base => ImageChoice {
            ami: image.ami.clone(),
            base: base.to_owned(),
            baked: Some(image.clone()),
            stale: None,
        },
        other => ImageChoice {
            ami: base.to_owned(),
            base: base.to_owned(),
            baked: None,
            stale: other.cloned(),
        },
    }
}

/// Puts `choice`'s image on every resource of `topology` that launches from one: launch
/// templates and configurations (so a group's next servers boot from it), and stand-alone
/// servers that do not exist yet. An existing stand-alone server that runs the base or the
/// baked image keeps the one it runs: the two differ only in packages its boot installed, and
/// baking an image must not replace a database server.
pub fn use_image(topology: &mut Topology, choice: &ImageChoice, observed: &Observed) {
    let equivalent = |ami: &str| ami == choice.base || ami == choice.ami;
    for resource in &mut topology.resources {
        let Some(attribute) = resource.attributes.get_mut("image") else {
            continue;
        };
        let running = (resource.id.kind == ResourceKind::Server)
            .then(|| observed.resources.get(&resource.id))
            .flatten()
            .and_then(|found| match found.attributes.get("image") {
                Some(Value::Text(ami)) if equivalent(ami) => Some(ami.clone()),
                _ => None,
            });
        attribute.value = Value::Text(running.unwrap_or_else(|| choice.ami.clone()));
    }
}

/// The SSM parameter recording the environment's baked image.
pub fn parameter_name(env: &AwsEnvironment) -> String {
    env.parameter(PARAMETER)
}

/// The recorded baked image, if any (an unreadable record is none: the next build writes it).
pub async fn recorded(
    env: &AwsEnvironment,
    clients: &Clients,
) -> Result<Option<RecordedImage>, AwsError> {
    crate::parameters::get_json(clients, &parameter_name(env)).await
}

/// The value of [`BUILDER_TAG`] for the environment.
pub fn builder_tag_value(env: &AwsEnvironment) -> String {
    format!("{}/{}", env.project(), env.name)
}

/// The builder's user-data without its outcome line (which carries the hash of this text).
fn builder_body(env: &AwsEnvironment) -> String {
    let packages = crate::userdata::boot_packages();
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "#!/bin/bash");
    let _ = writeln!(
        w,
        "# rigger image build: every role's packages for {}/{}, baked into an image.",
        env.project(),
        env.name
    );
    let _ = writeln!(
        w,
        "# Runs once as a builder instance's user-data: its log and outcome go to the console\n\
         # (GetConsoleOutput), then the instance powers off and rigger makes the image."
    );
    w.push_str("set -uo pipefail\numask 022\nexport DEBIAN_FRONTEND=noninteractive\n\n");
    w.push_str("log() { printf 'rigger: %s\\n' \"$*\" >&2; }\n");
    w.push_str(crate::userdata::INSTALL_PACKAGES_FUNCTION);
    w.push_str(&crate::userdata::leave_debian_daemons_off());
    w.push_str("\nbake() {\n  set -e\n");
    let _ = writeln!(w, "  install_packages {}", packages.join(" "));
    // Debian's own daemons stay off, as every boot script leaves them.
    w.push_str("  leave_debian_daemons_off\n");
    w.push_str(
        r#"  # What every instance launched from the image makes its own.
  apt-get clean
  rm -rf /var/lib/apt/lists/*
  rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
  : >/etc/machine-id
  if command -v cloud-init >/dev/null; then
    cloud-init clean --logs
  else
    rm -rf /var/lib/cloud/instance /var/lib/cloud/instances
  fi
  log "packages baked: $(dpkg-query -W -f='${Package}\n' | wc -l) installed"
}
"#,
    );
    let _ = writeln!(w, "\nlog={BUILDER_LOG}");
    w.push_str("set +e\n(bake) >\"$log\" 2>&1\nstatus=$?\n");
    w.push_str(
        "if [ \"$status\" -eq 0 ]; then outcome=ok; else outcome=\"failed (exit $status)\"; fi\n",
    );
    s
}

/// The packages hash of a build from `base`: the base AMI and the builder's script, so a new
/// package, unit or step makes a new image.
pub fn packages_hash(env: &AwsEnvironment, base: &str) -> String {
    let digest = sha2::Sha256::digest(format!("base {base}\n{}", builder_body(env)).as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The builder's whole user-data for packages hash `hash`: [`builder_body`], then the end of
/// the log and the outcome line on the console, then a poweroff.
pub fn builder_script(env: &AwsEnvironment, hash: &str) -> String {
    let mut s = builder_body(env);
    let _ = write!(
        s,
        r#"{{
  echo '----- rigger image build: the end of {BUILDER_LOG} -----'
  tail -n {CONSOLE_TAIL_LINES} "$log"
  echo "{OUTCOME_MARKER} $outcome {hash}"
}} >/dev/console 2>&1
sync
systemctl poweroff --no-block || poweroff
"#
    );
    s
}

/// What the builder's console says of build `hash`: `Ok` when it reported success, else why
/// not, with the end of its log.
pub fn outcome_from_console(console: &str, hash: &str) -> Result<(), String> {
    let outcome = console
        .lines()
        .rev()
        .find_map(|line| line.trim_end_matches('\r').split_once(OUTCOME_MARKER))
        .map(|(_, rest)| rest.trim().to_owned());
    let tail = || {
        let lines: Vec<&str> = console.lines().collect();
        let start = lines.len().saturating_sub(40);
        lines[start..].join("\n  ")
    };
    match outcome {
        Some(rest) if rest == format!("ok {hash}") => Ok(()),
        Some(rest) if rest.ends_with(hash) => Err(format!(
            "the builder reported: {}; the end of its console:\n  {}",
            rest.trim_end_matches(hash).trim(),
            tail()
        )),
        Some(rest) => Err(format!(
            "the builder's outcome line is for another build ({rest}); the end of its console:\n  {}",
            tail()
        )),
        None if console.trim().is_empty() => {
            Err("the builder's console output is empty (its user-data may not have run)".to_owned())
        }
        None => Err(format!(
            "the builder stopped without reporting an outcome; the end of its console:\n  {}",
            tail()
        )),
    }
}

/// How long a build waits, and how often it looks.
#[derive(Debug, Clone, Copy)]
pub struct BuildWaits {
    pub poll: Duration,
    /// From launch to the builder stopped (booting, installing, powering off).
    pub builder: Duration,
    /// From `CreateImage` to `available`.
    pub image: Duration,
    /// For the console output to carry the outcome once the builder stopped (AWS posts it
    /// shortly after the stop).
    pub console: Duration,
    /// For a terminated builder to be gone, so its security group can be deleted.
    pub cleanup: Duration,
    /// How often a long wait reports that it still waits.
    pub progress: Duration,
}

impl Default for BuildWaits {
    fn default() -> BuildWaits {
        BuildWaits {
            poll: Duration::from_secs(3),
            builder: Duration::from_secs(30 * 60),
            image: Duration::from_secs(45 * 60),
            console: Duration::from_secs(3 * 60),
            cleanup: Duration::from_secs(10 * 60),
            progress: Duration::from_secs(30),
        }
    }
}

/// What `rigger image build` is asked.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuildOptions {
    /// Build even when an image with the same packages hash exists.
    pub force: bool,
    pub waits: BuildWaits,
}

/// What a build did.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildOutcome {
    /// An available image with the same packages hash existed: recorded, nothing built.
    Reused(RecordedImage),
    Built {
        image: RecordedImage,
        /// Launch to the builder stopped with its packages installed.
        builder_seconds: f64,
        /// `CreateImage` to `available`.
        image_seconds: f64,
    },
}

impl BuildOutcome {
    pub fn image(&self) -> &RecordedImage {
        match self {
            BuildOutcome::Reused(image) | BuildOutcome::Built { image, .. } => image,
        }
    }
}

/// Bakes the environment's image (or reuses one with the same packages hash) and records it.
/// Whatever happens, no builder instance or security group is left once it returns; one
/// killed half-way leaves them tagged, and the next build (or [`clean_up`]) removes them.
pub async fn build(
    env: &AwsEnvironment,
    clients: &Clients,
    network: &Network,
    options: BuildOptions,
    report: &dyn Progress,
) -> Result<BuildOutcome, AwsError> {
    let waits = options.waits;
    let removed = clean_up(env, clients, waits, report).await?;
    if !removed.is_empty() {
        report.report(&format!(
            "removed what an interrupted build left: {}",
            removed.join(", ")
        ));
    }
    let base = env.aws().ami.clone();
    check_base(clients, &base).await?;
    let hash = packages_hash(env, &base);
    if !options.force
        && let Some(image) = existing(env, clients, &hash, waits, report).await?
    {
        record(env, clients, &image).await?;
        return Ok(BuildOutcome::Reused(image));
    }
    let result = bake(env, clients, network, &base, &hash, waits, report).await;
    // Every path: the builder and its group go, whether the bake worked or not.
    let cleaned = clean_up(env, clients, waits, report).await;
    let outcome = result?;
    cleaned?;
    record(env, clients, outcome.image()).await?;
    Ok(outcome)
}

/// Whether AMI `ami` exists in the clients' region (the builder's base, the image servers
/// launch from).
pub(crate) async fn image_exists(clients: &Clients, ami: &str) -> Result<bool, AwsError> {
    Ok(!clients
        .ec2
        .describe_images()
        .image_ids(ami)
        .send()
        .await
        .op("DescribeImages", ami)?
        .images()
        .is_empty())
}

async fn check_base(clients: &Clients, base: &str) -> Result<(), AwsError> {
    if !image_exists(clients, base).await? {
        return Err(AwsError::precondition(
            "DescribeImages",
            base,
            format!("the base image does not exist in {}", clients.region),
            crate::ErrorKind::MissingImage.hint(),
        ));
    }
    Ok(())
}

/// Writes the record `plan`, `up` and `deploy` read.
async fn record(
    env: &AwsEnvironment,
    clients: &Clients,
    image: &RecordedImage,
) -> Result<(), AwsError> {
    let json = serde_json::to_string(image).expect("a record serializes");
    crate::parameters::put(clients, &parameter_name(env), &json).await
}

/// The environment's image with packages hash `hash`: an available one, or a pending one
/// waited for (an earlier build interrupted after `CreateImage`).
async fn existing(
    env: &AwsEnvironment,
    clients: &Clients,
    hash: &str,
    waits: BuildWaits,
    report: &dyn Progress,
) -> Result<Option<RecordedImage>, AwsError> {
    let images = clients
        .ec2
        .describe_images()
        .owners("self")
        .filters(crate::tags::filter(
            &format!("tag:{}", rigger_topology::tag::PROJECT),
            [env.project()],
        ))
        .filters(crate::tags::filter(
            &format!("tag:{}", rigger_topology::tag::ENVIRONMENT),
            [env.name.as_str()],
        ))
        .filters(crate::tags::filter(
            &format!("tag:{PACKAGES_HASH_TAG}"),
            [hash],
        ))
        .send()
        .await
        .op("DescribeImages", format!("(packages hash {})", &hash[..12]))?;
    let state = |image: &ec2::Image| image.state().map(|s| s.as_str().to_owned());
    let mut candidates: Vec<&ec2::Image> = images
        .images()
        .iter()
        .filter(|i| matches!(state(i).as_deref(), Some("available" | "pending")))
        .collect();
    // Available first, then the newest.
    candidates.sort_by_key(|i| {
        (
            state(i).as_deref() != Some("available"),
            std::cmp::Reverse(i.creation_date().unwrap_or_default().to_owned()),
        )
    });
    let Some(image) = candidates.first() else {
        return Ok(None);
    };
    let ami = image.image_id().unwrap_or_default().to_owned();
    if state(image).as_deref() == Some("pending") {
        report.report(&format!(
            "an earlier build's image {ami} (same packages) is still being made: waiting for it"
        ));
        wait_available(clients, &ami, waits, report).await?;
    }
    Ok(Some(RecordedImage {
        ami,
        base: env.aws().ami.clone(),
        packages_hash: hash.to_owned(),
        name: image.name().unwrap_or_default().to_owned(),
    }))
}

/// Launch, wait for the stop, check the outcome, make the image and wait for it.
async fn bake(
    env: &AwsEnvironment,
    clients: &Clients,
    network: &Network,
    base: &str,
    hash: &str,
    waits: BuildWaits,
    report: &dyn Progress,
) -> Result<BuildOutcome, AwsError> {
    let subnet = network.subnets.first().ok_or_else(|| {
        AwsError::precondition(
            "RunInstances",
            "(image builder)",
            format!(
                "the VPC {} has no subnet to launch the builder in",
                network.vpc_id
            ),
            "set `subnets` in rigger.toml",
        )
    })?;
    let tag_value = builder_tag_value(env);
    let name = format!("{}-{}-image-builder", env.project(), env.name);
    let tags = |kind: ec2::ResourceType| {
        ec2::TagSpecification::builder()
            .resource_type(kind)
            .tags(
                ec2::Tag::builder()
                    .key(BUILDER_TAG)
                    .value(&tag_value)
                    .build(),
            )
            .tags(ec2::Tag::builder().key("Name").value(&name).build())
            .build()
    };
    // Admits nothing: the builder is never reached, it only fetches packages.
    let group = clients
        .ec2
        .create_security_group()
        .group_name(&name)
        .description("rigger image build: the builder instance (admits nothing)")
        .vpc_id(&network.vpc_id)
        .tag_specifications(tags(ec2::ResourceType::SecurityGroup))
        .send()
        .await
        .op("CreateSecurityGroup", &name)?
        .group_id()
        .unwrap_or_default()
        .to_owned();
    let script = builder_script(env, hash);
    let instance_type = env.env().web.instance_type.clone();
    let launched = clients
        .ec2
        .run_instances()
        .image_id(base)
        .instance_type(ec2::InstanceType::from(instance_type.as_str()))
        .min_count(1)
        .max_count(1)
        .subnet_id(&subnet.id)
        .security_group_ids(&group)
        .user_data(base64::engine::general_purpose::STANDARD.encode(script))
        .instance_initiated_shutdown_behavior(ec2::ShutdownBehavior::Stop)
        .metadata_options(
            ec2::InstanceMetadataOptionsRequest::builder()
                .http_tokens(ec2::HttpTokensState::Required)
                .build(),
        )
        .tag_specifications(tags(ec2::ResourceType::Instance))
        .send()
        .await
        .op("RunInstances", &name)?;
    let builder = launched
        .instances()
        .first()
        .and_then(|i| i.instance_id())
        .unwrap_or_default()
        .to_owned();
    let started = Instant::now();
    report.report(&format!(
        "builder {builder} launched from {base} ({instance_type}, subnet {}): installing {} packages, then it powers off",
        subnet.id,
        crate::userdata::boot_packages().len()
    ));
    let mut said = Instant::now();
    loop {
        let state = instance_state(clients, &builder).await?;
        match state.as_deref() {
            Some("stopped") => break,
            Some("pending" | "running" | "stopping") => {}
            other => {
                return Err(AwsError::precondition(
                    "DescribeInstances",
                    &builder,
                    format!(
                        "the builder is {} instead of stopping by itself; {}",
                        other.unwrap_or("gone"),
                        console_tail(clients, &builder).await
                    ),
                    "run `rigger image build` again; if it fails again, the console output above says why",
                ));
            }
        }
        if started.elapsed() >= waits.builder {
            return Err(AwsError::precondition(
                "DescribeInstances",
                &builder,
                format!(
                    "the builder did not stop within {} min; {}",
                    waits.builder.as_secs() / 60,
                    console_tail(clients, &builder).await
                ),
                "its packages may not be reachable from the subnet (the builder needs the Debian archive: a public IP or a NAT gateway)",
            ));
        }
        if said.elapsed() >= waits.progress {
            report.report(&format!(
                "builder {builder} is {} ({:.0} s)",
                state.as_deref().unwrap_or("?"),
                started.elapsed().as_secs_f64()
            ));
            said = Instant::now();
        }
        tokio::time::sleep(waits.poll).await;
    }
    let builder_seconds = started.elapsed().as_secs_f64();
    // AWS posts the console output shortly after the stop: read until the outcome is there.
    let asked = Instant::now();
    loop {
        let console = console_output(clients, &builder).await?;
        match outcome_from_console(&console, hash) {
            Ok(()) => break,
            Err(why) => {
                let reported = console.contains(OUTCOME_MARKER);
                if reported || asked.elapsed() >= waits.console {
                    return Err(AwsError::precondition(
                        "GetConsoleOutput",
                        &builder,
                        format!("the image build failed: {why}"),
                        format!(
                            "fix what the log shows and run `rigger image build -e {}` again (the builder was removed)",
                            env.name
                        ),
                    ));
                }
            }
        }
        tokio::time::sleep(waits.poll).await;
    }
    report.report(&format!(
        "builder {builder} installed the packages and stopped ({builder_seconds:.0} s)"
    ));

    let image_name = format!(
        "{}-{}-rigger-{}-{}",
        env.project(),
        env.name,
        &hash[..12],
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    );
    let mut image_tags = ec2::TagSpecification::builder().resource_type(ec2::ResourceType::Image);
    for (key, value) in [
        (rigger_topology::tag::PROJECT, env.project()),
        (rigger_topology::tag::ENVIRONMENT, env.name.as_str()),
        (PACKAGES_HASH_TAG, hash),
        (BASE_TAG, base),
        ("Name", image_name.as_str()),
    ] {
        image_tags = image_tags.tags(ec2::Tag::builder().key(key).value(value).build());
    }
    let image_started = Instant::now();
    let ami = clients
        .ec2
        .create_image()
        .instance_id(&builder)
        .name(&image_name)
        .description(format!(
            "rigger: every role's packages for {}/{} on {base}",
            env.project(),
            env.name
        ))
        .tag_specifications(image_tags.build())
        .send()
        .await
        .op("CreateImage", &builder)?
        .image_id()
        .unwrap_or_default()
        .to_owned();
    report.report(&format!("image {ami} ({image_name}) is being made"));
    wait_available(clients, &ami, waits, report).await?;
    let image_seconds = image_started.elapsed().as_secs_f64();
    report.report(&format!("image {ami} is available ({image_seconds:.0} s)"));
    Ok(BuildOutcome::Built {
        image: RecordedImage {
            ami,
            base: base.to_owned(),
            packages_hash: hash.to_owned(),
            name: image_name,
        },
        builder_seconds,
        image_seconds,
    })
}

async fn wait_available(
    clients: &Clients,
    ami: &str,
    waits: BuildWaits,
    report: &dyn Progress,
) -> Result<(), AwsError> {
    let started = Instant::now();
    let mut said = Instant::now();
    loop {
        let found = clients
            .ec2
            .describe_images()
            .image_ids(ami)
            .send()
            .await
            .op("DescribeImages", ami)?;
        let image = found.images().first();
        let state = image.and_then(|i| i.state()).map(|s| s.as_str().to_owned());
        match state.as_deref() {
            Some("available") => return Ok(()),
            Some("pending") | None => {}
            Some(other) => {
                let reason = image
                    .and_then(|i| i.state_reason())
                    .and_then(|r| r.message())
                    .unwrap_or("no reason given");
                return Err(AwsError::precondition(
                    "CreateImage",
                    ami,
                    format!("the image is {other}: {reason}"),
                    "run `rigger image build` again",
                ));
            }
        }
        if started.elapsed() >= waits.image {
            return Err(AwsError::Timeout {
                what: format!("image {ami} to be available"),
                seconds: waits.image.as_secs(),
            });
        }
        if said.elapsed() >= waits.progress {
            report.report(&format!(
                "image {ami} is still pending ({:.0} s)",
                started.elapsed().as_secs_f64()
            ));
            said = Instant::now();
        }
        tokio::time::sleep(waits.poll).await;
    }
}

async fn instance_state(clients: &Clients, id: &str) -> Result<Option<String>, AwsError> {
    let found = clients
        .ec2
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .op("DescribeInstances", id)?;
    Ok(found
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .find(|i| i.instance_id() == Some(id))
        .and_then(|i| i.state())
        .and_then(|s| s.name())
        .map(|n| n.as_str().to_owned()))
}

/// The builder's console output, decoded.
async fn console_output(clients: &Clients, id: &str) -> Result<String, AwsError> {
    let answer = clients
        .ec2
        .get_console_output()
        .instance_id(id)
        .send()
        .await
        .op("GetConsoleOutput", id)?;
    let bytes = answer
        .output()
        .and_then(|text| {
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .ok()
        })
        .unwrap_or_default();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The end of the builder's console for an error message (or why it cannot be read).
async fn console_tail(clients: &Clients, id: &str) -> String {
    match console_output(clients, id).await {
        Ok(text) if !text.trim().is_empty() => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(40);
            format!("the end of its console:\n  {}", lines[start..].join("\n  "))
        }
        Ok(_) => "its console output is empty".to_owned(),
        Err(error) => format!("its console output could not be read: {error}"),
    }
}

/// Terminates every builder instance of the environment and deletes their security groups
/// (found by [`BUILDER_TAG`]); returns what it removed. Safe at any time: a build's start, its
/// end, after Ctrl-C.
pub async fn clean_up(
    env: &AwsEnvironment,
    clients: &Clients,
    waits: BuildWaits,
    report: &dyn Progress,
) -> Result<Vec<String>, AwsError> {
    let tag_value = builder_tag_value(env);
    let tagged = || crate::tags::filter(&format!("tag:{BUILDER_TAG}"), [tag_value.as_str()]);
    let mut removed = Vec::new();
    let alive = builders(clients, tagged()).await?;
    let to_terminate: Vec<String> = alive
        .iter()
        .filter(|(_, state)| state != "shutting-down")
        .map(|(id, _)| id.clone())
        .collect();
    if !to_terminate.is_empty() {
        clients
            .ec2
            .terminate_instances()
            .set_instance_ids(Some(to_terminate.clone()))
            .send()
            .await
            .op("TerminateInstances", to_terminate.join(", "))?;
        report.report(&format!(
            "terminating the builder {}",
            to_terminate.join(", ")
        ));
        removed.extend(to_terminate.iter().map(|id| format!("builder {id}")));
    }
    let groups = clients
        .ec2
        .describe_security_groups()
        .filters(tagged())
        .send()
        .await
        .op("DescribeSecurityGroups", format!("(tagged {tag_value})"))?;
    let groups: Vec<String> = groups
        .security_groups()
        .iter()
        .filter_map(|g| g.group_id().map(str::to_owned))
        .collect();
    if alive.is_empty() && groups.is_empty() {
        return Ok(removed);
    }
    // A group is in use until its instance is gone.
    let started = Instant::now();
    while !builders(clients, tagged()).await?.is_empty() {
        if started.elapsed() >= waits.cleanup {
            return Err(AwsError::Timeout {
                what: format!("the image builder(s) of {tag_value} to terminate"),
                seconds: waits.cleanup.as_secs(),
            });
        }
        tokio::time::sleep(waits.poll).await;
    }
    for group in groups {
        loop {
            match clients
                .ec2
                .delete_security_group()
                .group_id(&group)
                .send()
                .await
                .op("DeleteSecurityGroup", &group)
            {
                Ok(_) => break,
                Err(error) if error.kind() == crate::ErrorKind::NotFound => break,
                // The terminated builder's interface is released a little later on AWS.
                Err(error)
                    if error.kind() == crate::ErrorKind::DependencyViolation
                        && started.elapsed() < waits.cleanup =>
                {
                    tokio::time::sleep(waits.poll).await;
                }
                Err(error) => return Err(error),
            }
        }
        removed.push(format!("security group {group}"));
    }
    Ok(removed)
}

/// The environment's builder instances that are not terminated: (id, state).
async fn builders(
    clients: &Clients,
    tagged: ec2::Filter,
) -> Result<Vec<(String, String)>, AwsError> {
    let found = clients
        .ec2
        .describe_instances()
        .filters(tagged)
        .send()
        .await
        .op("DescribeInstances", "(image builders)")?;
    let mut alive: BTreeMap<String, String> = BTreeMap::new();
    for instance in found.reservations().iter().flat_map(|r| r.instances()) {
        let state = instance
            .state()
            .and_then(|s| s.name())
            .map_or("unknown", |n| n.as_str());
        if state != "terminated" {
            alive.insert(
                instance.instance_id().unwrap_or_default().to_owned(),
                state.to_owned(),
            );
        }
    }
    Ok(alive.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rigger_plan::ObservedResource;
    use rigger_topology::{Resource, ResourceId};

    fn env(ami: &str) -> AwsEnvironment {
        let text = format!(
            r#"[project]
name = "surveys"
app_path = "app"
wsgi_module = "surveys.wsgi:application"
celery_app = "surveys"
domains = ["surveys.example.com"]

[environments.prod]
provider = "aws"
region = "us-east-1"
ami = "{ami}"
certificate = "arn:aws:iam::123456789012:server-certificate/x"
"#
        );
        let config = rigger_config::parse(&text, "rigger.toml").expect("valid");
        AwsEnvironment::new(config, "prod").expect("aws")
    }

    fn recorded(base: &str) -> RecordedImage {
        RecordedImage {
            ami: "ami-0baked000000000000".into(),
            base: base.into(),
            packages_hash: "a".repeat(64),
            name: "surveys-prod-rigger".into(),
        }
    }

    #[test]
    fn the_script_installs_every_boot_package_and_leaves_debians_daemons_off() {
        let env = env("ami-12345678");
        let hash = packages_hash(&env, "ami-12345678");
        let script = builder_script(&env, &hash);
        let install = script
            .lines()
            .find(|l| l.trim_start().starts_with("install_packages "))
            .expect("an install line");
        for package in crate::userdata::boot_packages() {
            assert!(
                install.split_whitespace().any(|word| word == package),
                "{package}"
            );
        }
        assert!(script.contains(crate::userdata::INSTALL_PACKAGES_FUNCTION));
        assert!(script.contains("--no-install-recommends"));
        for unit in crate::userdata::DEBIAN_UNITS {
            assert!(script.contains(unit), "{unit}");
        }
        assert!(script.contains("systemctl mask epmd.socket epmd.service"));
        assert!(script.contains(&format!("echo \"{OUTCOME_MARKER} $outcome {hash}\"")));
        assert!(script.contains(">/dev/console"));
        assert!(
            script
                .trim_end()
                .ends_with("systemctl poweroff --no-block || poweroff")
        );
        // Each instance makes these its own.
        assert!(script.contains("rm -f /etc/ssh/ssh_host_*_key"));
        assert!(script.contains(": >/etc/machine-id"));
    }

    #[test]
    fn the_script_passes_bash_and_shellcheck() {
        let env = env("ami-12345678");
        let script = builder_script(&env, &packages_hash(&env, "ami-12345678"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("builder.sh");
        std::fs::write(&path, &script).unwrap();
        for (tool, args) in [("bash", &["-n"][..]), ("shellcheck", &["-s", "bash"][..])] {
            let checked = std::process::Command::new(tool)
                .args(args)
                .arg(&path)
                .output()
                .unwrap_or_else(|e| panic!("running {tool}: {e}"));
            assert!(
                checked.status.success(),
                "{tool}:\n{}{}",
                String::from_utf8_lossy(&checked.stdout),
                String::from_utf8_lossy(&checked.stderr)
            );
        }
    }

    #[test]
    fn the_hash_follows_the_base_and_the_script() {
        let env = env("ami-12345678");
        let a = packages_hash(&env, "ami-12345678");
        assert_eq!(a.len(), 64);
        assert_eq!(a, packages_hash(&env, "ami-12345678"));
        assert_ne!(a, packages_hash(&env, "ami-87654321"));
    }

    #[test]
    fn the_outcome_is_read_from_the_console() {
        let hash = "b".repeat(64);
        let ok = format!("boot\nlog line\n{OUTCOME_MARKER} ok {hash}\r\n[  OK  ] Stopped\n");
        assert_eq!(outcome_from_console(&ok, &hash), Ok(()));
        let failed = format!(
            "E: Unable to locate package nginx\n{OUTCOME_MARKER} failed (exit 100) {hash}\n"
        );
        let why = outcome_from_console(&failed, &hash).unwrap_err();
        assert!(why.contains("failed (exit 100)"), "{why}");
        assert!(why.contains("Unable to locate package nginx"), "{why}");
        let other = format!("{OUTCOME_MARKER} ok {}\n", "c".repeat(64));
        assert!(
            outcome_from_console(&other, &hash)
                .unwrap_err()
                .contains("another build")
        );
        assert!(
            outcome_from_console("", &hash)
                .unwrap_err()
                .contains("empty")
        );
        assert!(
            outcome_from_console("booting\n", &hash)
                .unwrap_err()
                .contains("without reporting")
        );
    }

    #[test]
    fn a_baked_image_is_used_only_for_its_base() {
        let none = choose("ami-12345678", None);
        assert_eq!(none.ami, "ami-12345678");
        assert!(none.describe("prod").contains("not baked"));
        let baked = choose("ami-12345678", Some(&recorded("ami-12345678")));
        assert_eq!(baked.ami, "ami-0baked000000000000");
        assert!(
            baked
                .describe("prod")
                .contains("baked by `rigger image build`")
        );
        let stale = choose("ami-87654321", Some(&recorded("ami-12345678")));
        assert_eq!(stale.ami, "ami-87654321");
        assert!(
            stale
                .describe("prod")
                .contains("was built from ami-12345678")
        );
    }

    #[test]
    fn templates_and_new_servers_take_the_baked_image_running_servers_keep_theirs() {
        let env = env("ami-12345678");
        let mut topology =
            rigger_topology::desired(&env.config, "prod", "initial").expect("topology");
        let choice = choose("ami-12345678", Some(&recorded("ami-12345678")));
        let image = |topology: &Topology, kind: ResourceKind| -> Vec<String> {
            topology
                .resources
                .iter()
                .filter(|r| r.id.kind == kind)
                .map(|r| match &r.attributes["image"].value {
                    Value::Text(ami) => ami.clone(),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        // The primary runs the base image; the cache server another image altogether.
        let server = |name: &str| ResourceId::new(ResourceKind::Server, name.to_owned());
        let running = |ami: &str| ObservedResource {
            attributes: [("image".to_owned(), Value::Text(ami.to_owned()))].into(),
            ..Default::default()
        };
        let mut observed = Observed::empty();
        let primary = env.names.server("db-primary");
        let cache = env.names.server("cache");
        observed
            .resources
            .insert(server(&primary), running("ami-12345678"));
        observed
            .resources
            .insert(server(&cache), running("ami-0ther0000000000000"));
        use_image(&mut topology, &choice, &observed);
        assert!(
            image(&topology, ResourceKind::LaunchTemplate)
                .iter()
                .all(|ami| ami == "ami-0baked000000000000")
        );
        let of = |name: &str| -> String {
            let resource: &Resource = topology
                .resources
                .iter()
                .find(|r| r.id == server(name))
                .unwrap();
            match &resource.attributes["image"].value {
                Value::Text(ami) => ami.clone(),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(of(&primary), "ami-12345678");
        // Not equivalent: rigger.toml's image change replaces it, as before.
        assert_eq!(of(&cache), "ami-0baked000000000000");
        let replica = env.names.server("db-replica1");
        assert_eq!(of(&replica), "ami-0baked000000000000");
    }
}
