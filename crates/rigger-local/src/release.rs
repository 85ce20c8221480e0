//! Releases: immutable copies of the app at a revision, with the venv its locked
//! requirements need, named `<UTC timestamp>-<short sha>`; and the history of deploys.
//!
//! A release directory holds the app's code (from `git archive`, or the working tree for the
//! first `up` and for `--allow-dirty`), `requirements.lock` (what `pip freeze` found in its
//! venv) and `release.json` (this manifest). No secret is ever written into a release: the app
//! gets its settings from each server's environment file at run time.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context as _, bail};
use rigger_recipes::Command;
use serde::{Deserialize, Serialize};

use crate::apply::run_command;
use crate::environment::LocalEnvironment;
use crate::paths::EnvPaths;

/// The release the first `up` builds from the working tree, before any deploy.
pub const INITIAL: &str = "initial";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseManifest {
    pub id: String,
    /// Full commit id, or empty for a working-tree copy.
    pub revision: String,
    /// `git`, or `working tree` (possibly with uncommitted changes).
    pub source: String,
    /// Unix seconds.
    pub created: u64,
    /// `user@host` of whoever built it.
    pub created_by: String,
    pub venv: PathBuf,
}

impl ReleaseManifest {
    pub fn load(paths: &EnvPaths, id: &str) -> anyhow::Result<ReleaseManifest> {
        let path = paths.release(id).join("release.json");
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "release `{id}` does not exist (no {}); `rigger releases` lists them",
                path.display()
            )
        })?;
        serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))
    }

    pub fn dir(&self, paths: &EnvPaths) -> PathBuf {
        paths.release(&self.id)
    }
}

/// `user@host` of this process.
pub fn who() -> String {
    let user = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map_or_else(|| "?".into(), |u| u.name);
    format!("{user}@{}", host())
}

/// This machine's host name.
pub fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "?".into(), |h| h.trim().to_owned())
}

/// Does process `pid` exist on this machine? (For locks: a holder whose process ended is gone.)
pub fn process_exists(pid: i32) -> bool {
    pid > 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The working tree's app as the `initial` release (the first `up`, before any deploy).
pub async fn ensure_initial(env: &LocalEnvironment) -> anyhow::Result<ReleaseManifest> {
    if let Ok(manifest) = ReleaseManifest::load(&env.paths, INITIAL) {
        return Ok(manifest);
    }
    // A copy from before releases had manifests: replaced (releases are immutable, but this
    // one was never complete).
    let _ = std::fs::remove_dir_all(env.paths.release(INITIAL));
    let staging = staging_dir(&env.paths, INITIAL)?;
    let log = env.paths.releases().join("build.log");
    copy_working_tree(&env.app_source(), &staging, &log).await?;
    finish(env, staging, INITIAL, String::new(), "working tree".into()).await
}

/// Builds a release of the app at `revision` (default HEAD). A working tree with uncommitted
/// changes under the app's path is refused unless `allow_dirty`, which then copies the working
/// tree as it is.
pub async fn build(
    env: &LocalEnvironment,
    revision: Option<&str>,
    allow_dirty: bool,
    now: u64,
) -> anyhow::Result<ReleaseManifest> {
    let app = env.app_source();
    let source = resolve(&app, revision, allow_dirty, now).await?;
    if let Ok(existing) = ReleaseManifest::load(&env.paths, &source.id) {
        return Ok(existing);
    }
    let staging = staging_dir(&env.paths, &source.id)?;
    let log = env.paths.releases().join("build.log");
    export(&app, &source, &staging, &log).await?;
    finish(env, staging, &source.id, source.revision, source.kind).await
}

/// What a release of the app is made from: the revision, its id, and whether it is the
/// working tree. Shared by every provider (the AWS provider ships the same tree to S3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseSource {
    /// `<UTC timestamp>-<short sha>`, `-dirty` for a working tree with uncommitted changes.
    pub id: String,
    /// The full commit id.
    pub revision: String,
    /// `git`, or `working tree (uncommitted changes)`.
    pub kind: String,
    /// The tree `git archive` exports (`SHA` or `SHA:PREFIX`); `None` for the working tree.
    archive: Option<(String, String)>,
}

/// Resolves `revision` (default HEAD) of the git repository holding `app`. A working tree with
/// uncommitted changes under `app` is refused unless `allow_dirty`.
pub async fn resolve(
    app: &Path,
    revision: Option<&str>,
    allow_dirty: bool,
    now: u64,
) -> anyhow::Result<ReleaseSource> {
    let top = git_output(app, &["rev-parse", "--show-toplevel"])
        .await
        .with_context(|| {
            format!(
                "{} is not in a git repository; a deploy builds a release from a git revision",
                app.display()
            )
        })?;
    let prefix = git_output(app, &["rev-parse", "--show-prefix"]).await?;
    let wanted = revision.unwrap_or("HEAD");
    let sha = git_output(
        app,
        &["rev-parse", "--verify", &format!("{wanted}^{{commit}}")],
    )
    .await
    .with_context(|| format!("`{wanted}` is not a revision of {top}"))?;
    let short = &sha[..sha.len().min(12)];
    let dirty = !git_output(app, &["status", "--porcelain", "--", "."])
        .await?
        .is_empty();
    let use_working_tree = dirty && revision.is_none();
    if use_working_tree && !allow_dirty {
        bail!(
            "{} has uncommitted changes; commit them, or deploy them anyway with --allow-dirty",
            app.display()
        );
    }
    let id = format!(
        "{}-{short}{}",
        timestamp(now),
        if use_working_tree { "-dirty" } else { "" }
    );
    // `git archive SHA:PREFIX` gives the app's subtree with paths relative to it.
    let tree = if prefix.is_empty() {
        sha.clone()
    } else {
        format!("{sha}:{}", prefix.trim_end_matches('/'))
    };
    Ok(ReleaseSource {
        id,
        revision: sha,
        kind: if use_working_tree {
            "working tree (uncommitted changes)".into()
        } else {
            "git".into()
        },
        archive: (!use_working_tree).then_some((top, tree)),
    })
}

/// Writes the app's tree of `source` into the empty directory `dest` (`git archive`, or a
/// copy of the working tree); `log` collects the copy's output.
pub async fn export(
    app: &Path,
    source: &ReleaseSource,
    dest: &Path,
    log: &Path,
) -> anyhow::Result<()> {
    match &source.archive {
        Some((top, tree)) => extract_archive(top, tree, dest).await,
        None => copy_working_tree(app, dest, log).await,
    }
}

fn staging_dir(paths: &EnvPaths, id: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(paths.releases())?;
    let staging = paths.releases().join(format!(".{id}.partial"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    Ok(staging)
}

async fn copy_working_tree(source: &Path, staging: &Path, log: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        source.join("manage.py").is_file(),
        "{} has no manage.py; set project.app_path in rigger.toml to the Django project's directory",
        source.display()
    );
    run_command(
        &Command::new("cp").args([
            "-R",
            &format!("{}/.", source.display()),
            &staging.display().to_string(),
        ]),
        None,
        log,
    )
    .await
    .context("copying the app's working tree")
}

async fn extract_archive(top: &str, tree: &str, staging: &Path) -> anyhow::Result<()> {
    let mut archive = tokio::process::Command::new("git")
        .args(["-C", top, "archive", "--format=tar", tree])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("running git archive")?;
    let stdout: Stdio = archive
        .stdout
        .take()
        .context("piped")?
        .try_into()
        .context("piping git archive")?;
    let untar = tokio::process::Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(staging)
        .stdin(stdout)
        .output()
        .await
        .context("running tar")?;
    let archived = archive.wait_with_output().await?;
    if !archived.status.success() {
        bail!(
            "git archive {tree} failed: {}",
            String::from_utf8_lossy(&archived.stderr).trim()
        );
    }
    if !untar.status.success() {
        bail!(
            "unpacking the release failed: {}",
            String::from_utf8_lossy(&untar.stderr).trim()
        );
    }
    Ok(())
}

/// Installs the release's venv, records its locked requirements and manifest, then moves it
/// into place: a release directory without `.partial` is always complete.
async fn finish(
    env: &LocalEnvironment,
    staging: PathBuf,
    id: &str,
    revision: String,
    source: String,
) -> anyhow::Result<ReleaseManifest> {
    let requirements = staging.join(&env.config.project.requirements);
    let venv = ensure_venv(&env.paths, &requirements).await?;
    let freeze = tokio::process::Command::new(venv.join("bin/pip"))
        .args(["freeze", "--disable-pip-version-check"])
        .env(
            "HOME",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
        )
        .output()
        .await
        .context("running pip freeze")?;
    std::fs::write(staging.join("requirements.lock"), &freeze.stdout)?;
    let manifest = ReleaseManifest {
        id: id.to_owned(),
        revision,
        source,
        created: crate::status::now(),
        created_by: who(),
        venv,
    };
    std::fs::write(
        staging.join("release.json"),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    let log = env.paths.releases().join("build.log");
    // Readable by the service users, writable by nobody: a release never changes.
    run_command(
        &Command::new("chmod").args(["-R", "a+rX,a-w", &staging.display().to_string()]),
        None,
        &log,
    )
    .await?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755))?;
    let dir = env.paths.release(id);
    std::fs::rename(&staging, &dir)
        .with_context(|| format!("moving the release into {}", dir.display()))?;
    Ok(manifest)
}

/// A venv per distinct requirements file (named by its hash), made with the system Python so
/// that service users can run it, shared by every release and environment that needs it.
pub async fn ensure_venv(paths: &EnvPaths, requirements: &Path) -> anyhow::Result<PathBuf> {
    let text = std::fs::read(requirements).with_context(|| {
        format!(
            "reading the app's requirements {} (project.requirements)",
            requirements.display()
        )
    })?;
    let venv = paths.venvs().join(format!("{:016x}", fnv1a(&text)));
    let stamp = venv.join(".rigger-complete");
    if stamp.exists() {
        return Ok(venv);
    }
    std::fs::create_dir_all(paths.venvs())?;
    std::fs::set_permissions(paths.venvs(), std::fs::Permissions::from_mode(0o755))?;
    let log = paths.venvs().join("install.log");
    let venv_s = venv.display().to_string();
    let _ = std::fs::remove_dir_all(&venv);
    tracing::info!(venv = %venv.display(), "creating the app's venv");
    run_command(
        &Command::new("/usr/bin/python3").args(["-m", "venv", &venv_s]),
        None,
        &log,
    )
    .await
    .context("creating the app's venv (is python3-venv installed? scripts/install-packages.sh)")?;
    let pip = venv.join("bin/pip").display().to_string();
    let install = Command::new(pip)
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            &requirements.display().to_string(),
        ])
        // pip needs a writable HOME for its cache; the invoking user's is fine.
        .env(
            "HOME",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
        );
    run_command(&install, None, &log).await.with_context(|| {
        format!(
            "installing {} into the venv (log: {})",
            requirements.display(),
            log.display()
        )
    })?;
    std::fs::write(&stamp, b"")?;
    Ok(venv)
}

/// 64-bit FNV-1a: names a venv by its requirements; not a security boundary.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

async fn git_output(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = tokio::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .await
        .context("running git (is it installed?)")?;
    if !output.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

pub use rigger_plan::deploys::utc_timestamp as timestamp;

/// One deploy in the environment's history (`releases.jsonl`).
pub use rigger_plan::deploys::DeployRecord;

pub fn append_history(paths: &EnvPaths, record: &DeployRecord) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.root().join("releases.jsonl"))?;
    writeln!(file, "{}", serde_json::to_string(record)?)?;
    Ok(())
}

pub fn history(paths: &EnvPaths) -> Vec<DeployRecord> {
    std::fs::read_to_string(paths.root().join("releases.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}
