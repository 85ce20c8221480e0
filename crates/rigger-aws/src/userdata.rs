//! User-data: the bash script a server runs at first boot, rendered from the same role
//! recipes as the local provider with [`rigger_recipes::Layout::systemd`].
//!
//! The script first lets only root reach the instance metadata service (an nftables rule
//! matching the packet's owner, loaded again at every boot before the network comes up), so no
//! service user can take the instance role's credentials. It then installs the role's Debian
//! packages (their own services disabled: rigger's systemd units run the programs), mounts the
//! data volume at the layout's data directory, fetches the secrets its roles' recipes use
//! ([`rigger_recipes::Role::secrets`], the only ones its instance profile allows) and the
//! environment CA's certificate from SSM Parameter Store (`aws ssm get-parameter
//! --with-decryption`), installs the server's certificate (a stand-alone server's, signed by
//! rigger, from SSM; a group server signs its own, which only the load balancer sees), writes
//! every file of the recipe (base64, with its mode and owner, placeholders replaced by the
//! secrets), runs the before-start steps, starts the units, waits for each service's
//! readiness probe, and runs the after-start steps. No server ever holds the CA's key.
//!
//! Servers launched together boot in any order and the script runs once, so a step that needs
//! a peer (a replica's base backup needs its primary up and set up) is retried with growing
//! pauses for a bounded time ([`RETRY_FUNCTION`]). Web and worker servers fetch their release
//! before anything starts; those of the first release ([`rigger_plan::deploys::INITIAL_RELEASE`]) run its
//! migrations first, one server at a time, so none serves before them. Debian's own units for
//! the programs rigger runs are disabled, and its epmd (which listens on every address)
//! masked.
//!
//! Right after the packages, the server publishes its SSH host keys for rigger to pin
//! ([`crate::hostkeys`]). Its data volume is only ever the EBS volume rigger attached, found
//! by its id ([`DataVolume`], [`DATA_VOLUME_FUNCTIONS`]): never instance storage, never a disk
//! holding something rigger did not make; every rigger unit requires its mount.
//!
//! Root never sources, runs or writes through what a service user can change: a command
//! probe loads the service's environment file as the service's user (`runuser`), recipe files
//! go into root's directories, the release is unpacked as root's files, and the app's
//! requirements are installed by an unprivileged build user into a venv that is root's once
//! built.
//!
//! Secrets are never in the script: the recipes get placeholders
//! ([`crate::environment::secret_placeholder`]) and only files flagged `contains_secret` get
//! them substituted, at boot, in memory. A group server's id and address are known only at
//! boot too: its recipe is rendered with [`SELF_ID`] and [`SELF_ADDRESS`], replaced in every
//! file and command by the instance's id and private address from the metadata service.
//!
//! [`script`] returns the text (the tests run `bash -n` and shellcheck on it); [`user_data`]
//! gzips and base64-encodes it, as cloud-init accepts and EC2 wants (16 KiB at most).

use std::fmt::Write as _;
use std::io::Write as _;

use base64::Engine as _;
use rigger_recipes::{
    Command, FileSpec, Probe, Recipe, Role, ServerContext, StepSpec, shell_quote,
};

use crate::environment::{
    AwsEnvironment, CA_CERT, SECRET_NAMES, SELF_ADDRESS, SELF_ID, secret_placeholder,
};

/// EC2's limit on user-data, before base64.
pub const MAX_USER_DATA: usize = 16 * 1024;

/// How long the script waits for a service to be ready, in seconds.
const READY_SECONDS: u32 = 300;

/// The base64 of the gzipped script, ready for RunInstances or a launch template.
pub fn user_data(
    env: &AwsEnvironment,
    ctx: &ServerContext,
    volume: &DataVolume,
) -> Result<String, String> {
    let text = script(env, ctx, volume)?;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder
        .write_all(text.as_bytes())
        .and_then(|()| encoder.flush())
        .map_err(|e| e.to_string())?;
    let gzipped = encoder.finish().map_err(|e| e.to_string())?;
    if gzipped.len() > MAX_USER_DATA {
        return Err(format!(
            "the user-data of {} is {} bytes gzipped, over EC2's limit of {MAX_USER_DATA}",
            ctx.server_id,
            gzipped.len()
        ));
    }
    Ok(base64::engine::general_purpose::STANDARD.encode(gzipped))
}

/// The script of a user-data [`user_data`] made: base64 decoded (again, as long as it is not
/// gzip yet: moto hands an instance's back encoded once more) and gunzipped. For tests and
/// diagnostics that read what a server boots with.
pub fn script_of(user_data: &str) -> Result<String, String> {
    use std::io::Read as _;
    let mut bytes = user_data.as_bytes().to_vec();
    while !bytes.starts_with(&[0x1f, 0x8b]) {
        bytes = base64::engine::general_purpose::STANDARD
            .decode(&bytes)
            .map_err(|e| format!("user-data is neither gzip nor base64: {e}"))?;
    }
    let mut script = String::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_string(&mut script)
        .map_err(|e| format!("user-data does not gunzip: {e}"))?;
    Ok(script)
}

/// The contents of the file whose path ends with `name` in a boot script: the reverse of
/// the `put PATH MODE OWNER KIND BASE64` lines [`write_file`] writes. For tests and
/// diagnostics.
pub fn file_in(script: &str, name: &str) -> Option<String> {
    let line = script.lines().find(|line| {
        line.strip_prefix("put ")
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|path| path.trim_matches('\'').ends_with(name))
    })?;
    let encoded = line.split_whitespace().last()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// The boot script of launch template `name`'s default version, the one its group launches
/// servers from; empty when the version has no user-data. For tests and diagnostics.
pub async fn default_version_script(
    ec2: &aws_sdk_ec2::Client,
    name: &str,
) -> Result<String, String> {
    let answer = ec2
        .describe_launch_template_versions()
        .launch_template_name(name)
        .versions("$Default")
        .send()
        .await
        .map_err(|error| format!("DescribeLaunchTemplateVersions {name}: {error}"))?;
    match answer
        .launch_template_versions()
        .first()
        .and_then(|version| version.launch_template_data())
        .and_then(|data| data.user_data())
    {
        Some(encoded) => script_of(encoded),
        None => Ok(String::new()),
    }
}

/// Packages every server installs, whatever its roles (the metadata firewall's `nftables` is
/// installed first, on its own, when missing).
const COMMON_PACKAGES: &[&str] = &["awscli", "ca-certificates", "curl", "openssl"];

/// Every Debian package a server's boot script may install, for images that bake them in
/// (the lab's, `rigger image build`), sorted.
pub fn boot_packages() -> Vec<&'static str> {
    let mut all: Vec<&str> = COMMON_PACKAGES.to_vec();
    all.push("nftables");
    for role in Role::ALL {
        all.extend(packages(role));
    }
    all.sort_unstable();
    all.dedup();
    all
}

/// Debian 12 packages each role needs.
fn packages(role: Role) -> &'static [&'static str] {
    match role {
        // postgresql-client: `rigger db` pauses and resumes PgBouncer with psql.
        Role::Web => &[
            "nginx",
            "pgbouncer",
            "stunnel4",
            "postgresql-client",
            "python3",
            "python3-venv",
        ],
        Role::Worker => &[
            "pgbouncer",
            "stunnel4",
            "postgresql-client",
            "python3",
            "python3-venv",
        ],
        Role::Cache => &["redis-server"],
        Role::Queue => &["rabbitmq-server"],
        Role::DbPrimary | Role::DbReplica => &["postgresql-15"],
        Role::Lb => &[],
    }
}

/// Debian's own units for the programs rigger runs under its own units.
pub(crate) const DEBIAN_UNITS: [&str; 7] = [
    "nginx.service",
    "pgbouncer.service",
    "stunnel4.service",
    "redis-server.service",
    "rabbitmq-server.service",
    "postgresql.service",
    "postgresql@15-main.service",
];

/// Debian's socket-activated epmd (package erlang-base), masked on every server: rigger's
/// queue recipe runs its own ([`rigger_recipes::ServerContext::start_epmd`]).
pub const DEBIAN_EPMD_UNITS: [&str; 2] = ["epmd.socket", "epmd.service"];

/// The shell function `leave_debian_daemons_off`, for every boot script and the image
/// builder's: Debian's own daemons for what rigger runs under units of its own
/// ([`DEBIAN_UNITS`]) disabled and stopped, in one call for those installed (each call is a
/// daemon reload, a second or so at boot), and Debian's epmd masked. Masked, not only
/// disabled: epmd.socket listens on every address of every server whose image has Erlang (a
/// baked image), and rabbitmq-server.service wants it; the queue server runs rigger's own
/// epmd, on its own address and loopback only.
pub fn leave_debian_daemons_off() -> String {
    format!(
        r#"
leave_debian_daemons_off() {{
  local units=()
  mapfile -t units < <(systemctl list-unit-files --no-legend --plain {units} 2>/dev/null | awk '{{print $1}}')
  [ "${{#units[@]}}" -eq 0 ] || systemctl disable --now "${{units[@]}}" >/dev/null 2>&1 || true
  # Template instances have no unit file of their own to list.
  systemctl stop {instances} >/dev/null 2>&1 || true
  systemctl mask {epmd} >/dev/null
  systemctl stop {epmd} >/dev/null 2>&1 || true
}}
"#,
        units = DEBIAN_UNITS.join(" "),
        instances = DEBIAN_UNITS
            .iter()
            .filter(|unit| unit.contains('@'))
            .copied()
            .collect::<Vec<_>>()
            .join(" "),
        epmd = DEBIAN_EPMD_UNITS.join(" "),
    )
}

/// Renders the whole recipe of the server described by `ctx` (every role, plus its
/// certificate) into the boot script, with `volume` as its data volume.
pub fn script(
    env: &AwsEnvironment,
    ctx: &ServerContext,
    volume: &DataVolume,
) -> Result<String, String> {
    let recipe = rigger_recipes::render_server(ctx).map_err(|e| e.to_string())?;
    let group_server = ctx.server_id == SELF_ID;
    let q = |word: &str| quote(word, group_server);
    let layout = &ctx.layout;
    let roles: Vec<&str> = ctx.roles.iter().map(|r| r.as_str()).collect();

    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "#!/bin/bash");
    let _ = writeln!(
        w,
        "# First boot of a {} server of {}/{} (release {}), rendered by rigger.",
        roles.join("+"),
        env.project(),
        env.name,
        ctx.project.release
    );
    let _ = writeln!(
        w,
        "# Secrets are not in this script: they are read from SSM Parameter Store at boot."
    );
    w.push_str(PRELUDE);
    w.push_str(RETRY_FUNCTION);
    w.push_str(INSTALL_PACKAGES_FUNCTION);
    w.push_str(DATA_VOLUME_FUNCTIONS);
    if is_app_server(ctx) {
        w.push_str(INSTALL_RELEASE_FUNCTION);
    }
    let _ = writeln!(w, "\nPARAMETERS={}", shell_quote(&env.parameter_prefix()));
    let _ = writeln!(w, "REGION={}", shell_quote(&env.aws().region));
    let _ = writeln!(w, "trap report_failed_boot EXIT");
    // Before anything else runs, above all any service of a user other than root.
    let _ = writeln!(
        w,
        "\nstep 'letting only root reach the instance metadata service'"
    );
    let _ = writeln!(w, "block_metadata_for_non_root");
    if group_server {
        w.push_str(
            "SELF_ID=$(imds instance-id)\nSELF_ADDRESS=$(imds local-ipv4)\nexport SELF_ID SELF_ADDRESS\n",
        );
    }

    // Packages, without letting Debian start its own copies of the services.
    let mut wanted: Vec<&str> = COMMON_PACKAGES.to_vec();
    for role in &ctx.roles {
        wanted.extend(packages(*role));
    }
    wanted.sort_unstable();
    wanted.dedup();
    let _ = writeln!(w, "\nstep 'installing packages'");
    let _ = writeln!(w, "install_packages {}", wanted.join(" "));
    w.push_str(&leave_debian_daemons_off());
    w.push_str("leave_debian_daemons_off\n");

    // As soon as the AWS CLI is there: rigger reaches no server whose keys it cannot pin, and
    // a server that fails later in its boot should still be reachable to be looked at.
    let _ = writeln!(w, "\nstep 'publishing the SSH host keys'");
    let _ = writeln!(
        w,
        "publish_host_keys || log 'warning: could not publish the SSH host keys: rigger will not reach this server'"
    );

    let _ = writeln!(w, "\nstep 'mounting the data volume'");
    let volume_id = match volume {
        DataVolume::Attached(id) => id.as_str(),
        DataVolume::Mapped => "",
    };
    let _ = writeln!(
        w,
        "mount_data_volume {} {}",
        q(&layout.data_dir.to_string_lossy()),
        shell_quote(volume_id)
    );

    // The secrets this server's recipes use (all its profile may read), in memory only.
    let _ = writeln!(w, "\nstep 'reading secrets from SSM'");
    w.push_str("declare -A SECRETS=()\n");
    let wanted: Vec<String> = secrets_of(&ctx.roles)
        .into_iter()
        .map(|name| format!("{} {name}", secret_placeholder(name)))
        .collect();
    if !wanted.is_empty() {
        let _ = writeln!(w, "read_secrets {}", wanted.join(" "));
    }
    let _ = writeln!(
        w,
        "install -d -m 0755 {}",
        q(&layout.pki_dir.to_string_lossy())
    );
    let _ = writeln!(
        w,
        "parameter {CA_CERT} | put_stdin {} 0644 root",
        q(&layout.ca_cert().to_string_lossy())
    );
    write_certificate(w, ctx)?;

    let _ = writeln!(w, "\nstep 'writing the recipe'");
    write_recipe_files(w, &recipe, group_server);
    let _ = writeln!(w, "unset SECRETS");

    write_release_fetch(w, env, ctx);

    write_maintenance(w, ctx);

    let _ = writeln!(w, "\nstep 'running the before-start steps'");
    for step in recipe
        .steps
        .iter()
        .filter(|s| s.phase == rigger_recipes::Phase::BeforeStart)
    {
        write_step(w, step, group_server);
    }
    write_first_release_migrations(w, ctx, group_server);
    write_collect_static(w, ctx, group_server);

    let _ = writeln!(w, "\nstep 'starting the services'");
    for service in &recipe.services {
        let _ = writeln!(
            w,
            "needs_data_volume {} {}",
            shell_quote(&rigger_recipes::unit_name(&service.name)),
            q(&layout.data_dir.to_string_lossy())
        );
    }
    w.push_str("systemctl daemon-reload\nsystemd-tmpfiles --create\n");
    for service in &recipe.services {
        let unit = rigger_recipes::unit_name(&service.name);
        let _ = writeln!(w, "systemctl enable --now {}", shell_quote(&unit));
        let check = format!(
            "ready_{}",
            service
                .name
                .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        );
        let body = probe(
            &service.readiness,
            &unit,
            service.env_file.as_deref(),
            group_server,
            layout,
        );
        let _ = writeln!(w, "{check}() {{\n{body}\n}}");
        let _ = writeln!(
            w,
            "wait_ready {} {READY_SECONDS} {check}",
            shell_quote(&service.name)
        );
    }

    let _ = writeln!(w, "\nstep 'running the after-start steps'");
    for step in recipe
        .steps
        .iter()
        .filter(|s| s.phase == rigger_recipes::Phase::AfterStart)
    {
        write_step(w, step, group_server);
    }
    let _ = writeln!(w, "step 'ready'");
    // Last: a server counts as booted only once every step above ran (crate::boot).
    let _ = writeln!(w, "report_boot {}", crate::boot::FINISHED);
    Ok(s)
}

/// The secrets the recipes of `roles` use, in [`SECRET_NAMES`]' order.
fn secrets_of(roles: &[Role]) -> Vec<&'static str> {
    SECRET_NAMES
        .into_iter()
        .filter(|name| roles.iter().any(|role| role.secrets().contains(name)))
        .collect()
}

/// The server's key and certificate. A stand-alone server's were signed by rigger with the
/// environment CA before it started ([`crate::secrets::issue_server_certificate`]): its
/// clients check them against the CA. A group server's id and address are known only now,
/// and the only client of its certificate is the load balancer, which accepts any: it signs
/// its own. Either way the CA's key stays with rigger.
fn write_certificate(w: &mut String, ctx: &ServerContext) -> Result<(), String> {
    let layout = &ctx.layout;
    if ctx.server_id == SELF_ID {
        let _ = writeln!(w, "\nstep 'signing the server certificate'");
        let pki = rigger_recipes::pki::self_signed_cert(layout, &ctx.server_id, ctx.address)
            .map_err(|e| e.to_string())?;
        write_recipe_files(w, &pki, true);
        for step in &pki.steps {
            write_step(w, step, true);
        }
        return Ok(());
    }
    let _ = writeln!(w, "\nstep 'installing the server certificate'");
    let _ = writeln!(
        w,
        "install -d -m 0700 -o root -g root {}",
        shell_quote(&layout.tls_dir.to_string_lossy())
    );
    let _ = writeln!(
        w,
        "parameter {} | put_stdin {} 0644 root",
        shell_quote(&rigger_topology::parameter::tls_cert(&ctx.server_id)),
        shell_quote(&layout.tls_cert().to_string_lossy())
    );
    let _ = writeln!(
        w,
        "parameter {} | put_stdin {} 0600 root",
        shell_quote(&rigger_topology::parameter::tls_key(&ctx.server_id)),
        shell_quote(&layout.tls_key().to_string_lossy())
    );
    Ok(())
}

/// Web and worker servers fetch their release from the environment's bucket (named in SSM)
/// with the instance profile and install it ([`INSTALL_RELEASE_FUNCTION`]): unpacked into the
/// layout's app directory (root's files, whatever owners the tarball records), its
/// requirements installed from the release's own wheels by the layout's build user into the
/// venv, which then becomes root's. Every release is in the bucket before a server
/// launches with it: a deploy uploads its own, `up` the first one
/// ([`rigger_plan::deploys::INITIAL_RELEASE`]).
fn write_release_fetch(w: &mut String, env: &AwsEnvironment, ctx: &ServerContext) {
    if !is_app_server(ctx) {
        return;
    }
    let release = &ctx.project.release;
    let _ = writeln!(
        w,
        "\nlog {}",
        shell_quote(&format!("fetching release {release}"))
    );
    let _ = writeln!(
        w,
        "bucket=$(parameter {})",
        crate::releases::BUCKET_PARAMETER
    );
    let _ = writeln!(
        w,
        "install_release \"$bucket\" {} \"$REGION\" {} {} {} {}",
        shell_quote(&crate::releases::object_key(release)),
        shell_quote(&ctx.layout.app_dir.to_string_lossy()),
        shell_quote(&ctx.layout.venv_dir.to_string_lossy()),
        shell_quote(&env.config.project.requirements.to_string_lossy()),
        shell_quote(&ctx.layout.users.build),
    );
}

/// Whether the server runs the app (a web or worker role).
fn is_app_server(ctx: &ServerContext) -> bool {
    ctx.roles
        .iter()
        .any(|r| matches!(r, Role::Web | Role::Worker))
}

/// The first release's migrations, on every app server that boots with it, before its app
/// starts ([`rigger_recipes::boot_migrations`]: under a PostgreSQL advisory lock, so the first
/// server does the work and the others find nothing to do; retried while the primary, launched
/// at the same time, is not up or set up yet). No server serves the first release before its
/// migrations ran, and the first `up` needs no SSH. Later releases are migrated by `rigger
/// deploy` before any server switches to them.
fn write_first_release_migrations(w: &mut String, ctx: &ServerContext, group_server: bool) {
    if !is_app_server(ctx) || ctx.project.release != rigger_plan::deploys::INITIAL_RELEASE {
        return;
    }
    let _ = writeln!(
        w,
        "\nstep 'running the migrations of the first release (one server at a time)'"
    );
    write_step(w, &rigger_recipes::boot_migrations(ctx), group_server);
}

/// Every web server gathers its release's static files into the layout's static root (the
/// app's `STATIC_ROOT`, the app user's directory) before its app and nginx start
/// ([`rigger_recipes::collect_static`]: as the app's user, its settings loaded by that user),
/// so the first request finds them. Each server has its own copy: nothing is shared between
/// servers on AWS.
fn write_collect_static(w: &mut String, ctx: &ServerContext, group_server: bool) {
    if !ctx.roles.contains(&Role::Web) {
        return;
    }
    let layout = &ctx.layout;
    let _ = writeln!(w, "\nstep 'collecting the static files'");
    let _ = writeln!(
        w,
        "install -d -m 0755 -o {www} -g {www} {}",
        quote(&layout.static_root.to_string_lossy(), group_server),
        www = shell_quote(&layout.users.www),
    );
    write_step(w, &rigger_recipes::collect_static(ctx), group_server);
}

/// A web server that boots while the environment is in maintenance (`rigger maintenance on`
/// records it in SSM as `maintenance` = `on`) starts in maintenance too: the load balancer
/// must not send it the site while the others answer 503.
fn write_maintenance(w: &mut String, ctx: &ServerContext) {
    if !ctx.roles.contains(&Role::Web) {
        return;
    }
    let _ = writeln!(
        w,
        "
if [ \"$(parameter {} 2>/dev/null || true)\" = on ]; then\n  log 'the environment is in maintenance'\n  {}\nfi",
        crate::maintenance::PARAMETER,
        rigger_recipes::operations::maintenance_line(&ctx.layout, true)
    );
}

/// The AWS CLI's settings for every script rigger runs on a server that calls it (boot, and
/// the SSH steps of `db backup`, `db restore` and a deploy's migrations): the CLI gives the
/// instance metadata service one attempt of one second, and then says "Unable to locate
/// credentials"; servers booting together (a group scaling out, a loaded host) make both it
/// and SSM answer slower. Bounded retries with backoff instead. (A macro so that the boot
/// script's prelude can include it as a literal.)
macro_rules! aws_cli_settings {
    () => {
        "# The AWS CLI: bounded retries with backoff, also for the instance metadata service.\n\
         export AWS_METADATA_SERVICE_TIMEOUT=5 AWS_METADATA_SERVICE_NUM_ATTEMPTS=5\n\
         export AWS_RETRY_MODE=standard AWS_MAX_ATTEMPTS=6\n"
    };
}

/// [`aws_cli_settings`], for the shell lines rigger sends over SSH.
pub const AWS_CLI_SETTINGS: &str = aws_cli_settings!();

/// Helpers every script starts with. `replace_all` avoids `${var//x/y}`, whose replacement
/// text bash 5.2 interprets (`&`); secrets may contain anything.
const PRELUDE: &str = concat!(
    r#"set -euo pipefail
umask 022
export DEBIAN_FRONTEND=noninteractive
"#,
    aws_cli_settings!(),
    r#"
log() { printf 'rigger: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
# step WHAT: logs the step the boot is at, with the seconds since the script started (where a
# slow boot spends its time), and remembers it for a failure report.
STEP='starting'
step() { STEP=$*; log "[${SECONDS} s] $*"; }

imds() {
  local token
  local curl=(curl -fsS --connect-timeout 2 --max-time 10 --retry 5 --retry-all-errors)
  token=$("${curl[@]}" -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' http://169.254.169.254/latest/api/token)
  "${curl[@]}" -H "X-aws-ec2-metadata-token: $token" "http://169.254.169.254/latest/meta-data/$1"
}

# Only root may reach the instance metadata service, and so the instance role's credentials:
# an nftables rule rejects every other user's packets to it. A unit loads it again at every
# boot, before the network and every service.
block_metadata_for_non_root() {
  command -v nft >/dev/null || install_packages nftables
  install -d -m 0755 /etc/rigger
  cat >/etc/rigger/metadata-firewall.nft <<'RULES'
table inet rigger_metadata
delete table inet rigger_metadata
table inet rigger_metadata {
  chain output {
    type filter hook output priority filter; policy accept;
    ip daddr 169.254.169.254 meta skuid != 0 reject
    ip6 daddr fd00:ec2::254 meta skuid != 0 reject
  }
}
RULES
  cat >/etc/systemd/system/rigger-metadata-firewall.service <<'UNIT'
[Unit]
Description=rigger: only root may reach the instance metadata service
DefaultDependencies=no
Before=network-pre.target
Wants=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/nft -f /etc/rigger/metadata-firewall.nft

[Install]
WantedBy=sysinit.target
UNIT
  systemctl daemon-reload
  systemctl enable --now rigger-metadata-firewall.service
}


parameter() {
  aws ssm get-parameter --region "$REGION" --with-decryption --name "$PARAMETERS$1" --query Parameter.Value --output text
}

# read_secrets PLACEHOLDER NAME...: reads the parameters NAME (this environment's, decrypted)
# in as few calls as GetParameters allows (10 names each: each AWS CLI call costs a second or
# more at boot) and sets SECRETS[PLACEHOLDER] to each value, in memory only. The values come
# base64-encoded from the CLI's JSON, so that any text survives the shell; like `$(parameter)`,
# trailing newlines are dropped. A parameter that is missing fails the boot, naming it.
read_secrets() {
  local -A placeholder_of=()
  local names=() batch lines name encoded
  while [ $# -gt 0 ]; do
    placeholder_of[$PARAMETERS$2]=$1
    names+=("$PARAMETERS$2")
    shift 2
  done
  while [ ${#names[@]} -gt 0 ]; do
    batch=("${names[@]:0:10}")
    names=("${names[@]:10}")
    lines=$(aws ssm get-parameters --region "$REGION" --with-decryption --names "${batch[@]}" --output json |
      python3 -c '
import base64, json, sys
answer = json.load(sys.stdin)
if answer.get("InvalidParameters"):
    sys.exit("missing parameters: " + " ".join(answer["InvalidParameters"]))
for parameter in answer["Parameters"]:
    print(parameter["Name"], base64.b64encode(parameter["Value"].encode()).decode())
')
    while read -r name encoded; do
      SECRETS[${placeholder_of[$name]}]=$(printf '%s' "$encoded" | base64 -d)
    done <<<"$lines"
  done
  for name in "${!placeholder_of[@]}"; do
    [ -n "${SECRETS[${placeholder_of[$name]}]+set}" ] || die "SSM did not return $name"
  done
}

# replace_all TEXT NEEDLE VALUE: sets REPLY to TEXT with every NEEDLE replaced by VALUE.
replace_all() {
  local rest=$1 out=''
  while [[ $rest == *"$2"* ]]; do
    out+=${rest%%"$2"*}$3
    rest=${rest#*"$2"}
  done
  REPLY=$out$rest
}

# publish_host_keys: this server's SSH host public keys, in the SSM parameter only its own
# instance profile may write (hostkeys/<instance id>): rigger pins them instead of trusting
# the first key it is shown.
publish_host_keys() {
  local id keys
  id=$(imds instance-id)
  keys=$(awk '{ print $1, $2 }' /etc/ssh/ssh_host_*_key.pub)
  aws ssm put-parameter --region "$REGION" --name "${PARAMETERS}hostkeys/$id" --type String \
    --overwrite --value "$keys" >/dev/null
}

# report_boot REPORT: how this server's boot went (`finished`, or `failed: STEP (exit N)`),
# in the SSM parameter only its own instance profile may write (boot/<instance id>): rigger
# counts a server booted only when it says so.
report_boot() {
  local id
  id=$(imds instance-id)
  aws ssm put-parameter --region "$REGION" --name "${PARAMETERS}boot/$id" --type String \
    --overwrite --value "$1" >/dev/null
}

# report_failed_boot: the EXIT trap; a boot that stops early reports the step it stopped at
# (best effort: before the AWS CLI is installed there is nothing to report with).
report_failed_boot() {
  local status=$?
  [ "$status" -eq 0 ] && return 0
  report_boot "failed: $STEP (exit $status)" || log "warning: could not report the failed boot"
}

# put_stdin PATH MODE OWNER: writes standard input to PATH atomically. OWNER is a user (with
# its group of the same name) or USER:GROUP. A missing directory is made 0755; an existing one
# keeps its mode (a key's 0700 directory stays so).
put_stdin() {
  local tmp
  [ -d "$(dirname "$1")" ] || install -d -m 0755 "$(dirname "$1")"
  tmp=$(mktemp "$1.XXXXXX")
  cat >"$tmp"
  case $3 in
    *:*) chown "$3" "$tmp" ;;
    *) chown "$3:$3" "$tmp" ;;
  esac
  chmod "$2" "$tmp"
  mv -f "$tmp" "$1"
}

# put PATH MODE OWNER KIND BASE64: writes a recipe file; KIND `secret` substitutes the
# secrets' placeholders, and on a group server every file gets its id and address.
put() {
  local contents key
  contents=$(printf '%s' "$5" | base64 -d; printf x)
  contents=${contents%x}
  if [ "$4" = secret ]; then
    for key in "${!SECRETS[@]}"; do
      replace_all "$contents" "$key" "${SECRETS[$key]}"
      contents=$REPLY
    done
  fi
  if [ -n "${SELF_ID:-}" ]; then
    replace_all "$contents" rigger-self-id "$SELF_ID"
    replace_all "$REPLY" 192.0.2.123 "$SELF_ADDRESS"
    contents=$REPLY
  fi
  printf '%s' "$contents" | put_stdin "$1" "$2" "$3"
}

# wait_ready NAME SECONDS COMMAND...: runs COMMAND until it succeeds.
wait_ready() {
  local name=$1 seconds=$2 tries=0
  shift 2
  until "$@" >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ "$tries" -lt "$seconds" ] || die "$name is not ready after $seconds s"
    sleep 1
  done
}

tcp_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2"; }
"#
);

/// The shell function that installs a release on an app server: at boot into the layout's app
/// directory and venv (user-data), and on the worker that runs a deploy's migrations into a
/// directory of their own (`rigger deploy`, over SSH, as root), so both get a release the same
/// way. The release's own wheels ([`crate::releases::WHEELS`]) are all pip may install from
/// (`--no-index`): servers never reach PyPI. Self-contained (no other function of the script).
pub const INSTALL_RELEASE_FUNCTION: &str = r#"
# install_release BUCKET KEY REGION APP_DIR VENV_DIR REQUIREMENTS BUILDER: the release's
# tarball from the bucket, unpacked into APP_DIR as root's files (not with the owners and modes
# of whoever built it), its requirements (a file inside APP_DIR) installed into VENV_DIR from
# the release's own wheels only (APP_DIR/wheels, pip --no-index) by the unprivileged BUILDER
# (pip runs the dependencies' code), after which the venv is root's: neither the builder nor
# the app can change what the app runs.
install_release() {
  local tarball requirements home
  tarball=$(mktemp)
  aws s3 cp --region "$3" --only-show-errors "s3://$1/$2" "$tarball"
  install -d -m 0755 "$4"
  tar -xzf "$tarball" -C "$4" --no-same-owner --no-same-permissions
  rm -f "$tarball"
  requirements=$(realpath -e -- "$4/$6") || {
    printf 'rigger: error: the release has no requirements file %s\n' "$6" >&2
    return 1
  }
  case $requirements in
    "$(realpath -e -- "$4")"/*) ;;
    *)
      printf 'rigger: error: the requirements %s lead outside the release (to %s)\n' "$6" "$requirements" >&2
      return 1
      ;;
  esac
  if [ ! -d "$4/wheels" ] || [ -L "$4/wheels" ]; then
    printf 'rigger: error: release %s carries no wheels (built by a rigger from before releases did): deploy a new release\n' "$2" >&2
    return 1
  fi
  id -u "$7" >/dev/null 2>&1 ||
    useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$7"
  home=$(mktemp -d)
  chown "$7:$7" "$home"
  install -d -m 0755 -o "$7" -g "$7" "$5"
  (cd "$4" && runuser -u "$7" -- env HOME="$home" python3 -m venv "$5")
  (cd "$4" && runuser -u "$7" -- env HOME="$home" "$5/bin/pip" install --quiet --disable-pip-version-check --no-index --find-links "$4/wheels" -r "$requirements")
  rm -rf "$home"
  chown -R 0:0 "$5"
  chmod -R go-w "$5"
}
"#;

/// The shell function that installs Debian packages a server needs: only those missing, so
/// a server booted from a baked image (`rigger image build`) never reaches the package
/// archive, and one from a stock image installs what it lacks (Debian's own units kept from
/// starting while they install: rigger runs the daemons under units of its own).
pub const INSTALL_PACKAGES_FUNCTION: &str = r#"
# install_packages PACKAGE...: installs the packages that are not installed yet; touches
# neither the archive nor the package lists when every one is, and reads the lists once per
# run (a stock boot installs nftables first, then the role's packages).
install_packages() {
  local missing=() package
  for package in "$@"; do
    if [ "$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null)" != 'install ok installed' ]; then
      missing+=("$package")
    fi
  done
  if [ ${#missing[@]} -eq 0 ]; then
    log "packages: all $# installed already"
    return 0
  fi
  log "packages: installing ${missing[*]}"
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod 0755 /usr/sbin/policy-rc.d
  if [ -z "${package_lists_read:-}" ]; then
    apt-get update -q
    package_lists_read=1
  fi
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  rm -f /usr/sbin/policy-rc.d
}
"#;

/// The shell function that runs a step waiting for a peer on another server
/// ([`rigger_recipes::Retry`]): servers launched together boot in any order, and user-data
/// runs once, so a single failed attempt (a replica's base backup before its primary is up)
/// would leave the server broken for good. Part of every script; the tests run it with
/// stand-in commands, and a `sleep` that only moves bash's `SECONDS` on.
pub const RETRY_FUNCTION: &str = r#"
# retry SECONDS WHAT CLEAN COMMAND...: runs COMMAND until it succeeds. After a failure it
# empties the directory CLEAN (when not ''), logs the attempt, and waits 5 s, then twice as
# long after each further failure (60 s at most); it gives up, ending the script, when the
# next attempt would start more than SECONDS after the first.
retry() {
  local seconds=$1 what=$2 clean=$3 attempt=0 pause=5 started=$SECONDS status
  shift 3
  while :; do
    attempt=$((attempt + 1))
    status=0
    "$@" || status=$?
    if [ "$status" -eq 0 ]; then
      [ "$attempt" -eq 1 ] || log "$what: succeeded at attempt $attempt"
      return 0
    fi
    if [ -n "$clean" ] && [ -d "$clean" ]; then
      find "$clean" -mindepth 1 -delete
    fi
    if [ $((SECONDS - started + pause)) -gt "$seconds" ]; then
      die "$what: attempt $attempt failed (exit status $status); giving up after $((SECONDS - started)) s (its limit is $seconds s)"
    fi
    log "$what: attempt $attempt failed (exit status $status); trying again in $pause s"
    sleep "$pause"
    pause=$((pause * 2))
    [ "$pause" -le 60 ] || pause=60
  done
}
"#;

/// The shell functions that find, check and mount the data volume (part of every script; the
/// tests run them against a fake `/dev` tree, whose root is their first argument). Only the
/// EBS volume rigger attached is ever formatted: on an instance type with instance storage,
/// the "first other disk" may be ephemeral, and a stop/start would wipe the database.
pub const DATA_VOLUME_FUNCTIONS: &str = r#"
# data_device ROOT VOLUME ROOT_DISK: prints the data volume's device (under ROOT: '' on a
# server), or nothing while it is not attached yet. VOLUME is the id of the EBS volume rigger
# attached (a stand-alone server's), or '' for the one of a group server's launch template. On
# Nitro instances an EBS volume is an NVMe disk whose serial is its id without the dash, linked
# by udev as /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol...; instance storage has
# another model name and is never chosen, nor is the root disk ROOT_DISK. Without such links
# (Xen instances) the disk is named after the mapping: /dev/sdf is /dev/xvdf. Fails when two
# disks could be it.
data_device() {
  local root=$1 serial=${2//-/} root_disk=$3 link name target found=''
  if compgen -G "$root/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_*" >/dev/null; then
    for link in "$root"/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol*; do
      name=${link##*/}
      case $name in *-part*) continue ;; esac
      if [ -n "$serial" ]; then
        case $name in
          "nvme-Amazon_Elastic_Block_Store_$serial" | "nvme-Amazon_Elastic_Block_Store_${serial}_"*) ;;
          *) continue ;;
        esac
      fi
      target=$(readlink -f "$link")
      if [ ! -e "$target" ] || [ "$target" = "$root_disk" ] || [ "$target" = "$found" ]; then
        continue
      fi
      if [ -n "$found" ]; then
        log "error: two EBS disks could be the data volume: $found and $target"
        return 1
      fi
      found=$target
    done
  elif [ -e "$root/dev/xvdf" ]; then
    found=$root/dev/xvdf
  fi
  printf '%s' "$found"
}

# data_filesystem DEVICE: prints `empty` (nothing on it: format it) or `ours` (the ext4
# filesystem labelled rigger-data rigger made on it); refuses anything else, or a device it
# cannot probe: rigger formats nothing it did not make.
data_filesystem() {
  local probe status=0
  # blkid says "nothing found" of a device it cannot open too.
  if ! head -c 4096 "$1" >/dev/null 2>&1; then
    log "error: cannot tell what $1 holds (it cannot be read): refusing to format it"
    return 1
  fi
  probe=$(blkid -p -o export "$1") || status=$?
  case $status in
    2) echo empty ;;
    0)
      if grep -qx 'TYPE=ext4' <<<"$probe" && grep -qx 'LABEL=rigger-data' <<<"$probe"; then
        echo ours
      else
        log "error: $1 holds $(grep -E '^(TYPE|PTTYPE|LABEL)=' <<<"$probe" | tr '\n' ' ')which rigger did not make: refusing to format or mount it as the data volume"
        return 1
      fi
      ;;
    *)
      log "error: cannot tell what $1 holds (blkid exited $status): refusing to format it"
      return 1
      ;;
  esac
}

# mount_data_volume TARGET VOLUME: waits (300 s at most) for the data volume (see
# data_device), formats it if it is empty, mounts it at TARGET, and has fstab mount it there
# by its filesystem's UUID at every later boot (nofail: the server still boots to be repaired; the units that
# need TARGET do not start without it, see needs_data_volume).
# root_disk: prints the disk holding the root filesystem (the partition's disk, or the device
# itself when the filesystem fills a whole disk), or nothing when the root filesystem is on no
# block device (a container's overlay, a network root): no disk to keep away from then.
root_disk() {
  local source parent
  source=$(findmnt -no SOURCE /)
  [ -b "$source" ] || return 0
  parent=$(lsblk -no PKNAME "$source" | head -n 1)
  if [ -n "$parent" ]; then echo "/dev/$parent"; else echo "$source"; fi
}

mount_data_volume() {
  local target=$1 volume=$2 root_disk device='' state uuid tries=0
  root_disk=$(root_disk)
  while :; do
    device=$(data_device '' "$volume" "$root_disk") || die "cannot tell which disk is the data volume"
    [ -z "$device" ] || break
    tries=$((tries + 1))
    [ "$tries" -lt 300 ] || die "the data volume ${volume:-at /dev/sdf} is not attached after 300 s"
    sleep 1
  done
  state=$(data_filesystem "$device") || die "$device is not the data volume rigger made"
  [ "$state" = ours ] || mkfs.ext4 -q -L rigger-data "$device"
  uuid=$(blkid -p -o value -s UUID "$device")
  [ -n "$uuid" ] || die "$device has no filesystem UUID after formatting"
  install -d -m 0755 "$target"
  grep -q "^UUID=$uuid " /etc/fstab || printf 'UUID=%s %s ext4 defaults,nofail 0 2\n' "$uuid" "$target" >>/etc/fstab
  # By the device found, not by the fstab line: `nofail` makes `mount TARGET` succeed without
  # mounting anything when the UUID cannot be resolved yet (no udev link right after mkfs),
  # and everything after would land on the root disk.
  mountpoint -q "$target" || mount -t ext4 "$device" "$target"
  mountpoint -q "$target" || die "$device did not mount at $target"
}

# needs_data_volume UNIT DIR: UNIT starts only with DIR's volume mounted, never on the root
# disk (a missing volume must not look like an empty database).
needs_data_volume() {
  install -d -m 0755 "/etc/systemd/system/$1.d"
  printf '[Unit]\nRequiresMountsFor=%s\n' "$2" >"/etc/systemd/system/$1.d/rigger-data-volume.conf"
}
"#;

/// Which disk a server formats and mounts as its data volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataVolume {
    /// The EBS volume rigger attaches to a stand-alone server, by id (`vol-0123...`).
    Attached(String),
    /// The EBS volume a group server's launch template maps at `/dev/sdf`, made with the
    /// instance (its id is known only then).
    Mapped,
}

/// Quotes a word for the script. On a group server a word holding the id or address
/// placeholder becomes a double-quoted word that expands `$SELF_ID` / `$SELF_ADDRESS`.
fn quote(word: &str, group_server: bool) -> String {
    let address = SELF_ADDRESS.to_string();
    if !group_server || !(word.contains(SELF_ID) || word.contains(&address)) {
        return shell_quote(word);
    }
    let mut escaped = String::with_capacity(word.len() + 8);
    for c in word.chars() {
        if matches!(c, '\\' | '"' | '$' | '`') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    let escaped = escaped
        .replace(SELF_ID, "${SELF_ID}")
        .replace(&address, "${SELF_ADDRESS}");
    format!("\"{escaped}\"")
}

fn write_recipe_files(w: &mut String, recipe: &Recipe, group_server: bool) {
    for dir in &recipe.dirs {
        let _ = writeln!(
            w,
            "install -d -m {:04o} -o {owner} -g {owner} {}",
            dir.mode,
            quote(&dir.path.to_string_lossy(), group_server),
            owner = shell_quote(&dir.owner),
        );
    }
    for file in &recipe.files {
        write_file(w, file, group_server);
    }
}

fn write_file(w: &mut String, file: &FileSpec, group_server: bool) {
    let kind = if file.contains_secret {
        "secret"
    } else {
        "plain"
    };
    let encoded = base64::engine::general_purpose::STANDARD.encode(file.contents.as_bytes());
    let _ = writeln!(
        w,
        "put {} {:04o} {} {kind} {encoded}",
        quote(&file.path.to_string_lossy(), group_server),
        file.mode,
        shell_quote(&file.owner),
    );
}

/// `cd DIR && runuser -u USER -- env K=V PROGRAM ARGS`, as needed.
fn command_line(command: &Command, group_server: bool) -> String {
    let mut words: Vec<String> = Vec::new();
    if let Some(user) = &command.user {
        words.extend([
            "runuser".into(),
            "-u".into(),
            shell_quote(user),
            "--".into(),
        ]);
    }
    if !command.env.is_empty() {
        words.push("env".into());
        for (key, value) in &command.env {
            words.push(quote(&format!("{key}={value}"), group_server));
        }
    }
    words.extend(command.argv().map(|word| quote(word, group_server)));
    let line = words.join(" ");
    match &command.cwd {
        Some(dir) => format!(
            "cd {} && {line}",
            quote(&dir.to_string_lossy(), group_server)
        ),
        None => line,
    }
}

/// A step's line; a step that waits for a peer ([`rigger_recipes::Retry`]) becomes a function
/// that [`RETRY_FUNCTION`] runs until it succeeds or its time is up.
fn write_step(w: &mut String, step: &StepSpec, group_server: bool) {
    let mut line = format!("({})", command_line(&step.command, group_server));
    if let Some(stdin) = &step.stdin_file {
        line.push_str(&format!(
            " <{}",
            quote(&stdin.to_string_lossy(), group_server)
        ));
    }
    let _ = writeln!(w, "# step {}", step.name);
    // The environment file's loader quotes its own "$1" and "$@".
    let directive = if line.contains(rigger_recipes::ENV_FILE_SCRIPT) {
        "# shellcheck disable=SC2016 # \"$1\" and \"$@\" are the loader's own\n"
    } else {
        ""
    };
    if let Some(retry) = &step.retry {
        let function = format!(
            "step_{}",
            step.name.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        );
        let _ = writeln!(w, "{function}() {{");
        if !directive.is_empty() {
            let _ = write!(w, "  {directive}");
        }
        let _ = writeln!(w, "  {line}\n}}");
        let clean = retry
            .clean
            .as_ref()
            .map_or_else(String::new, |dir| dir.to_string_lossy().into_owned());
        line = format!(
            "retry {} {} {} {function}",
            retry.within.as_secs(),
            shell_quote(&format!("step {}", step.name)),
            quote(&clean, group_server)
        );
    } else {
        w.push_str(directive);
    }
    match &step.creates {
        Some(path) => {
            let _ = writeln!(
                w,
                "[ -e {} ] || {line}",
                quote(&path.to_string_lossy(), group_server)
            );
        }
        None => {
            let _ = writeln!(w, "{line}");
        }
    }
}

/// The body of a service's readiness function for `wait_ready`. A probe that checks a
/// certificate against the CA checks a group server's against itself: it signed its own.
fn probe(
    readiness: &Probe,
    unit: &str,
    env_file: Option<&std::path::Path>,
    group_server: bool,
    layout: &rigger_recipes::Layout,
) -> String {
    let q = |word: &str| quote(word, group_server);
    let trusted = |ca_file: &std::path::Path| {
        if group_server && ca_file == layout.ca_cert() {
            layout.tls_cert()
        } else {
            ca_file.to_path_buf()
        }
    };
    match readiness {
        Probe::Tcp { addr, port } => format!("  tcp_open {} {port}", q(&addr.to_string())),
        Probe::Tls {
            addr,
            port,
            server_name,
            ca_file,
        } => format!(
            "  openssl s_client -connect {}:{port} -servername {} -CAfile {} -verify_return_error </dev/null",
            q(&addr.to_string()),
            q(server_name),
            q(&trusted(ca_file).to_string_lossy())
        ),
        Probe::Https {
            addr,
            port,
            server_name,
            ca_file,
            host,
            path,
            expect_status,
        } => format!(
            "  [ \"$(curl -sS -o /dev/null -w '%{{http_code}}' --cacert {} --resolve {}:{port}:{} -H {} https://{}:{port}{})\" = {expect_status} ]",
            q(&trusted(ca_file).to_string_lossy()),
            q(server_name),
            q(&addr.to_string()),
            q(&format!("Host: {host}")),
            q(server_name),
            q(path)
        ),
        // The service's environment file is loaded by the probe's own process, after
        // `runuser` made it the service's user: root never sources a file of a service's.
        Probe::Command(command) => match env_file {
            Some(file) => format!(
                "  # shellcheck disable=SC2016 # \"$1\" and \"$@\" are the loader's own\n  {}",
                command_line(&command.clone().with_env_file(file), group_server)
            ),
            None => format!("  {}", command_line(command, group_server)),
        },
        Probe::Running => format!("  systemctl is-active --quiet {}", shell_quote(unit)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_written_into_a_boot_script_reads_back_from_its_user_data() {
        let mut script = String::from("#!/bin/bash\n");
        write_file(
            &mut script,
            &rigger_recipes::FileSpec {
                path: "/etc/stunnel/stunnel.conf".into(),
                contents: "connect = 10.0.0.5:5432\n".into(),
                mode: 0o644,
                owner: "root".into(),
                contains_secret: false,
            },
            true,
        );
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(script.as_bytes()).unwrap();
        let encoded = base64::engine::general_purpose::STANDARD.encode(encoder.finish().unwrap());
        // moto hands an instance's user-data back encoded once more.
        let twice = base64::engine::general_purpose::STANDARD.encode(&encoded);
        for user_data in [&encoded, &twice] {
            let read = script_of(user_data).unwrap();
            assert_eq!(read, script);
            assert_eq!(
                file_in(&read, "stunnel.conf").as_deref(),
                Some("connect = 10.0.0.5:5432\n")
            );
            assert_eq!(file_in(&read, "pgbouncer.ini"), None);
        }
        assert!(script_of("not base64!").is_err());
    }
}
