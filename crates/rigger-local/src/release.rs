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
pub use rigger_plan::deploys::INITIAL_RELEASE;

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

/// The working tree's app as the `initial` release (the first `up`, before any deploy).
pub async fn ensure_initial(env: &LocalEnvironment) -> anyhow::Result<ReleaseManifest> {
    if let Ok(manifest) = ReleaseManifest::load(&env.paths, INITIAL_RELEASE) {
        return Ok(manifest);
    }
    // A copy from before releases had manifests: replaced (releases are immutable, but this
    // one was never complete).
    let _ = std::fs::remove_dir_all(env.paths.release(INITIAL_RELEASE));
    let staging = staging_dir(&env.paths, INITIAL_RELEASE)?;
    let log = env.paths.releases().join("build.log");
    copy_working_tree(&env.app_source(), &staging, &log).await?;
    finish(
        env,
        staging,
        INITIAL_RELEASE,
        String::new(),
        "working tree".into(),
    )
    .await
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
    let dirty = has_uncommitted_changes(app).await?;
    let use_working_tree = dirty && revision.is_none();
    if use_working_tree && !allow_dirty {
        bail!(
            "{} has uncommitted changes; commit them, or deploy them anyway with --allow-dirty",
            app.display()
        );
    }
    let id = format!(
        "{}-{short}{}",
        rigger_plan::deploys::utc_timestamp(now),
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

/// Whether the working tree has changes under `app` that are not committed (untracked files
/// included).
pub async fn has_uncommitted_changes(app: &Path) -> anyhow::Result<bool> {
    Ok(!git_output(app, &["status", "--porcelain", "--", "."])
        .await?
        .is_empty())
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
    let log = env.paths.releases().join("build.log");
    // Readable by the service users (and the build user, which reads the requirements),
    // writable by nobody: a release never changes. The top stays rigger's to finish.
    run_command(
        &Command::new("chmod").args(["-R", "a+rX,a-w", &staging.display().to_string()]),
        None,
        &log,
    )
    .await?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755))?;
    let venv = ensure_venv(&env.paths, &staging, &env.config.project.requirements).await?;
    let freeze = pip_freeze(&venv).await?;
    write_read_only(&staging.join("requirements.lock"), &freeze)?;
    let manifest = ReleaseManifest {
        id: id.to_owned(),
        revision,
        source,
        created: rigger_engine::clock::unix_now(),
        created_by: who(),
        venv,
    };
    write_read_only(
        &staging.join("release.json"),
        &serde_json::to_vec_pretty(&manifest)?,
    )?;
    let dir = env.paths.release(id);
    std::fs::rename(&staging, &dir)
        .with_context(|| format!("moving the release into {}", dir.display()))?;
    Ok(manifest)
}

fn write_read_only(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))?;
    Ok(())
}

/// The user that builds the app's venvs when rigger runs as root
/// ([`rigger_recipes::ServiceUsers::build`]). Building runs the app's dependencies' code
/// (`setup.py`, build backends), so it never runs as root, nor as a service user whose files
/// it could then change: this system user owns nothing once a build ends (the venv is then
/// root's, read-only to everyone else). rigger creates it when missing.
pub fn build_user_name() -> String {
    rigger_recipes::ServiceUsers::debian().build
}

/// Name of the file that marks a venv complete (written by rigger once the venv is root's).
const VENV_COMPLETE: &str = ".rigger-complete";

/// A venv per distinct requirements file (named by its hash), made with the system Python so
/// that service users can run it, shared by every release and environment that needs it.
///
/// `requirements` is relative to `app` (the release's copy of the app, as
/// `project.requirements` is relative to `app_path`) and must stay inside it, links
/// resolved. The venv is built by the build user ([`build_user_name`], when rigger is root),
/// under an exclusive lock per requirements hash so that two environments or processes never
/// build the same venv at once, then made root's and read-only.
pub async fn ensure_venv(
    paths: &EnvPaths,
    app: &Path,
    requirements: &Path,
) -> anyhow::Result<PathBuf> {
    let requirements = confined_requirements(app, requirements)?;
    let text = std::fs::read(&requirements).with_context(|| {
        format!(
            "reading the app's requirements {} (project.requirements)",
            requirements.display()
        )
    })?;
    let hash = format!("{:016x}", fnv1a(&text));
    let venv = paths.venvs().join(&hash);
    if is_complete(&venv) {
        return Ok(venv);
    }
    let venvs = crate::safe_fs::Dir::create(&paths.venvs())?;
    venvs.set_owner_and_mode(None, 0o755)?;
    let _lock = lock(paths.venvs().join(format!(".{hash}.lock"))).await?;
    // Built by another rigger while this one waited for the lock.
    if is_complete(&venv) {
        return Ok(venv);
    }
    let builder = Builder::new(paths.venvs().join(".build-home")).await?;
    let log = paths.venvs().join("install.log");
    let venv_s = venv.display().to_string();
    match std::fs::remove_dir_all(&venv) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing the incomplete venv {venv_s}"));
        }
        _ => {}
    }
    crate::safe_fs::Dir::create(&venv)?.set_owner_and_mode(builder.owner(), 0o755)?;
    tracing::info!(venv = %venv.display(), "creating the app's venv");
    let as_builder = |command: Command| builder.command(command, app);
    run_command(
        &as_builder(Command::new("/usr/bin/python3").args(["-m", "venv", &venv_s])),
        None,
        &log,
    )
    .await
    .context("creating the app's venv (is python3-venv installed? scripts/install-packages.sh)")?;
    let pip = venv.join("bin/pip").display().to_string();
    let install = Command::new(pip).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "-r",
        &requirements.display().to_string(),
    ]);
    run_command(&as_builder(install), None, &log)
        .await
        .with_context(|| {
            format!(
                "installing {} into the venv (log: {})",
                requirements.display(),
                log.display()
            )
        })?;
    // Root's from now on: neither the builder nor a service user can change what the app runs.
    builder.hand_to_root(&venv, &log).await?;
    std::fs::write(venv.join(VENV_COMPLETE), b"")?;
    Ok(venv)
}

/// Who runs pip for rigger: the build user ([`build_user_name`]) when rigger is root, rigger
/// itself otherwise, with a `HOME` of its own (pip keeps its cache there: the only place the
/// builder can write besides what it builds). Shared by the app's venvs and a release's wheels.
struct Builder {
    user: Option<nix::unistd::User>,
    home: PathBuf,
}

impl Builder {
    /// The builder, its `home` made (0700, its own).
    async fn new(home: PathBuf) -> anyhow::Result<Builder> {
        let user = build_user().await?;
        let builder = Builder { user, home };
        crate::safe_fs::Dir::create(&builder.home)?.set_owner_and_mode(builder.owner(), 0o700)?;
        Ok(builder)
    }

    /// The owner of what the builder makes (`None`: rigger's own user).
    fn owner(&self) -> Option<crate::safe_fs::Owner> {
        self.user.as_ref().map(|user| (user.uid, user.gid))
    }

    /// `command` run in `cwd` as the builder, with its `HOME`.
    fn command(&self, command: Command, cwd: &Path) -> Command {
        let command = command
            .env("HOME", self.home.display().to_string())
            .cwd(cwd);
        match &self.user {
            Some(user) => command.user(user.name.clone()),
            None => command,
        }
    }

    /// Makes `path` (what the builder made) root's and writable by nobody else, when rigger
    /// is root. `chown -R` does not follow links (it changes the links themselves), `chmod -R`
    /// skips them.
    async fn hand_to_root(&self, path: &Path, log: &Path) -> anyhow::Result<()> {
        if self.user.is_none() {
            return Ok(());
        }
        let path = path.display().to_string();
        for command in [
            Command::new("chown").args(["-R", "0:0", &path]),
            Command::new("chmod").args(["-R", "go-w", &path]),
        ] {
            run_command(&command, None, log).await?;
        }
        Ok(())
    }
}

/// The Python that servers run a release with, which its wheels must suit: `python` is
/// CPython's `major.minor`, `machine` the architecture (`platform.machine()`), `glibc` the
/// newest C library the wheels may need (manylinux tags above it would not install).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WheelTarget {
    pub python: &'static str,
    pub machine: &'static str,
    pub glibc: (u32, u32),
    /// Said in errors: what runs the servers (`Debian 12`).
    pub system: &'static str,
}

/// Builds wheels for every requirement of the app tree `app` (its `requirements`, relative to
/// it and inside it) into the new directory `wheels`, so servers install the release with
/// `pip install --no-index --find-links`, never reaching PyPI. pip downloads and builds here,
/// with this machine's `/usr/bin/python3`, which must be `target`'s (a wheel built for another
/// Python or platform would not install there): anything else is refused before pip runs.
/// pip runs as the build user (it runs the dependencies' build code); `work` is an empty
/// directory for its venv and home, which must be reachable by that user; the wheels end up
/// root's. `log` collects pip's output.
pub async fn build_wheels(
    app: &Path,
    requirements: &Path,
    wheels: &Path,
    work: &Path,
    target: WheelTarget,
    log: &Path,
) -> anyhow::Result<()> {
    check_wheel_python(target).await?;
    let requirements = confined_requirements(app, requirements)?;
    let builder = Builder::new(work.join("home")).await?;
    let venv = work.join("pip");
    for dir in [venv.as_path(), wheels] {
        crate::safe_fs::Dir::create(dir)?.set_owner_and_mode(builder.owner(), 0o755)?;
    }
    let venv_s = venv.display().to_string();
    run_command(
        &builder.command(
            Command::new("/usr/bin/python3").args(["-m", "venv", &venv_s]),
            app,
        ),
        None,
        log,
    )
    .await
    .context("creating a venv to build the release's wheels in (is python3-venv installed?)")?;
    let pip = venv.join("bin/pip").display().to_string();
    let wheel = Command::new(pip).args([
        "wheel",
        "--quiet",
        "--disable-pip-version-check",
        "--wheel-dir",
        &wheels.display().to_string(),
        "-r",
        &requirements.display().to_string(),
    ]);
    run_command(&builder.command(wheel, app), None, log)
        .await
        .with_context(|| {
            format!(
                "building the wheels of {} (log: {})",
                requirements.display(),
                log.display()
            )
        })?;
    builder.hand_to_root(wheels, log).await
}

/// Refuses, before pip runs, a `/usr/bin/python3` whose wheels would not install on servers
/// running `target`.
async fn check_wheel_python(target: WheelTarget) -> anyhow::Result<()> {
    // -I -S: the system's interpreter alone, no site packages or environment variables.
    let output = tokio::process::Command::new("/usr/bin/python3")
        .args(["-I", "-S", "-c"])
        .arg(
            "import platform, sys; \
             print('%d.%d' % sys.version_info[:2], platform.machine(), \
             platform.python_implementation(), *platform.libc_ver())",
        )
        .env_clear()
        .output()
        .await
        .context("running /usr/bin/python3, which builds the release's wheels (install python3)")?;
    anyhow::ensure!(
        output.status.success(),
        "/usr/bin/python3 failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let found = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    wheel_python_suits(&found, target)
}

/// Whether `found` (`3.11 x86_64 CPython glibc 2.36`, what [`check_wheel_python`] prints)
/// can build wheels for `target`; the error says what differs and what to do.
fn wheel_python_suits(found: &str, target: WheelTarget) -> anyhow::Result<()> {
    let words: Vec<&str> = found.split_whitespace().collect();
    let glibc = match words.get(3..5) {
        Some(["glibc", version]) => {
            let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
            match (parts.next().flatten(), parts.next().flatten()) {
                (Some(major), Some(minor)) => Some((major, minor)),
                _ => None,
            }
        }
        _ => None,
    };
    let suits = words.first() == Some(&target.python)
        && words.get(1) == Some(&target.machine)
        && words.get(2) == Some(&"CPython")
        && glibc.is_some_and(|version| version <= target.glibc);
    anyhow::ensure!(
        suits,
        "this machine's /usr/bin/python3 is `{found}`, but the servers run CPython {} on {} \
         ({}, glibc {}.{}): a release carries wheels built here for them, which would not \
         install there; build releases on a machine like the servers ({} {} with its own \
         python3)",
        target.python,
        target.machine,
        target.system,
        target.glibc.0,
        target.glibc.1,
        target.system,
        target.machine,
    );
    Ok(())
}

/// `requirements` resolved against `app`, links included, refused unless it is a file
/// inside `app`: a link in the app's tree must not make rigger install from elsewhere.
pub fn confined_requirements(app: &Path, requirements: &Path) -> anyhow::Result<PathBuf> {
    let tree = app
        .canonicalize()
        .with_context(|| format!("reading the app's tree {}", app.display()))?;
    let given = app.join(requirements);
    let real = given.canonicalize().with_context(|| {
        format!(
            "reading the app's requirements {} (project.requirements)",
            given.display()
        )
    })?;
    if !real.starts_with(&tree) {
        bail!(
            "the app's requirements {} lead outside the app ({}, through a link or `..`);              project.requirements must name a file inside app_path",
            given.display(),
            real.display()
        );
    }
    if !real.is_file() {
        bail!(
            "the app's requirements {} is not a file (project.requirements)",
            given.display()
        );
    }
    Ok(real)
}

/// A venv is complete once rigger marked it so after making it its own: the directory and
/// the mark are root's (rigger's), and nobody else can write the directory. A build cut short
/// leaves the venv the builder's, so it is built again.
fn is_complete(venv: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let dir = std::fs::symlink_metadata(venv);
    let mark = std::fs::symlink_metadata(venv.join(VENV_COMPLETE));
    dir.is_ok_and(|m| m.is_dir() && crate::safe_fs::only_trusted_can_write_mode(m.uid(), m.mode()))
        && mark.is_ok_and(|m| m.is_file() && crate::safe_fs::is_trusted_owner(m.uid()))
}

/// Takes the exclusive `flock` on `path` (created 0600), waiting for its holder; released
/// when the returned value is dropped, or by the kernel when the process dies.
async fn lock(path: PathBuf) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt as _;
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .with_context(|| format!("opening the lock {}", path.display()))?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| errno)
            .with_context(|| format!("locking {}", path.display()))
    })
    .await?
}

/// The build user ([`build_user_name`]) when rigger is root (created if missing), `None`
/// otherwise: an unprivileged rigger builds as itself.
async fn build_user() -> anyhow::Result<Option<nix::unistd::User>> {
    if !crate::apply::is_root() {
        return Ok(None);
    }
    let name = build_user_name();
    let find = || nix::unistd::User::from_name(&name).context("looking up the build user");
    if let Some(user) = find()? {
        return Ok(Some(user));
    }
    // One creation at a time on the machine: builds of different venvs, or of environments
    // with different state directories, may start together, and concurrent `useradd`s do
    // not mix well. /run is root's alone.
    let _lock = lock(PathBuf::from("/run/rigger-build-user.lock")).await?;
    if let Some(user) = find()? {
        return Ok(Some(user));
    }
    let created = tokio::process::Command::new("useradd")
        .args(["--system", "--user-group", "--no-create-home"])
        .args(["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"])
        .arg(&name)
        .output()
        .await
        .context("running useradd")?;
    match find()? {
        Some(user) => Ok(Some(user)),
        None => bail!(
            "creating the user `{name}`, which builds the app's venvs, failed: {}; create it \
             with `useradd --system --user-group --no-create-home --shell /usr/sbin/nologin \
             {name}`",
            String::from_utf8_lossy(&created.stderr).trim()
        ),
    }
}

/// `pip freeze` of `venv`, run as the build user: it runs code the app's dependencies
/// installed (`.pth` files), which root never runs.
async fn pip_freeze(venv: &Path) -> anyhow::Result<Vec<u8>> {
    let builder = build_user_name();
    let user = crate::apply::is_root().then_some(builder.as_str());
    let env = std::collections::BTreeMap::from([("HOME".to_owned(), "/nonexistent".to_owned())]);
    let args = ["freeze", "--disable-pip-version-check"].map(String::from);
    let output = crate::process::command("pip freeze", &venv.join("bin/pip"), &args, &env, user)?
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .await
        .context("running pip freeze")?;
    if !output.status.success() {
        bail!(
            "pip freeze in {} failed: {}",
            venv.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output.stdout)
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

/// One deploy in the environment's history (`releases.jsonl`).
pub use rigger_plan::deploys::DeployRecord;

/// The release history: one JSON record per line, appended.
fn history_path(paths: &EnvPaths) -> std::path::PathBuf {
    paths.root().join("releases.jsonl")
}

/// Appends `record` to the release history and syncs it (a record torn by a crash is cut
/// off first: [`crate::files::append_record`]).
pub fn append_history(paths: &EnvPaths, record: &DeployRecord) -> anyhow::Result<()> {
    crate::files::append_record(&history_path(paths), record)
}

/// The release history, oldest first. A line that is not a record is an error naming the file
/// and line, never skipped (a rollback chooses its release from this).
pub fn history(paths: &EnvPaths) -> anyhow::Result<Vec<DeployRecord>> {
    crate::files::read_records(
        &history_path(paths),
        "a deploy record",
        "the release history is damaged: fix or remove that line (rollbacks choose their \
         release from this file)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(release: &str) -> DeployRecord {
        DeployRecord {
            release: release.into(),
            revision: "abc".into(),
            by: "me@host".into(),
            started: 1,
            finished: 2,
            result: "succeeded".into(),
            reason: String::new(),
        }
    }

    #[test]
    fn a_record_torn_by_a_crash_is_cut_off_and_a_damaged_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let paths = EnvPaths::for_root_for_tests(dir.path());
        paths.create_root().unwrap();
        append_history(&paths, &record("one")).unwrap();
        // A crash in the middle of the next append.
        let path = history_path(&paths);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(r#"{"release":"to"#);
        std::fs::write(&path, &text).unwrap();
        let read: Vec<String> = history(&paths)
            .unwrap()
            .into_iter()
            .map(|r| r.release)
            .collect();
        assert_eq!(read, ["one"], "the torn append is not a record");
        append_history(&paths, &record("two")).unwrap();
        let read: Vec<String> = history(&paths)
            .unwrap()
            .into_iter()
            .map(|r| r.release)
            .collect();
        assert_eq!(read, ["one", "two"]);

        std::fs::write(
            &path,
            format!("not json\n{}", std::fs::read_to_string(&path).unwrap()),
        )
        .unwrap();
        let error = format!("{:#}", history(&paths).unwrap_err());
        assert!(
            error.contains("releases.jsonl:1: not a deploy record"),
            "{error}"
        );
    }

    const DEBIAN_12: WheelTarget = WheelTarget {
        python: "3.11",
        machine: "x86_64",
        glibc: (2, 36),
        system: "Debian 12",
    };

    #[test]
    fn wheels_are_built_only_by_a_python_like_the_servers() {
        wheel_python_suits("3.11 x86_64 CPython glibc 2.36", DEBIAN_12).unwrap();
        // An older C library's wheels install on a newer one.
        wheel_python_suits("3.11 x86_64 CPython glibc 2.31", DEBIAN_12).unwrap();
        for (found, differs) in [
            ("3.12 x86_64 CPython glibc 2.36", "3.12"),
            ("3.11 aarch64 CPython glibc 2.36", "aarch64"),
            ("3.11 x86_64 PyPy glibc 2.36", "PyPy"),
            ("3.11 x86_64 CPython glibc 2.39", "2.39"),
            ("3.11 x86_64 CPython", "3.11 x86_64 CPython"),
        ] {
            let error = wheel_python_suits(found, DEBIAN_12)
                .unwrap_err()
                .to_string();
            assert!(error.contains(differs), "{error}");
            assert!(error.contains("CPython 3.11 on x86_64"), "{error}");
            assert!(error.contains("Debian 12"), "{error}");
        }
    }
}
