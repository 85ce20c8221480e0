//! The app's venvs: built from requirements inside the app only, by an unprivileged user (when
//! rigger is root), once per requirements file even when several builders race, and root's
//! and read-only once built. Real `python3 -m venv` and pip; the requirements install nothing,
//! so no network is needed.

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _, symlink};
use std::path::{Path, PathBuf};

use nix::unistd::geteuid;
use rigger_local::paths::EnvPaths;
use rigger_local::release::{build_user_name, ensure_venv};

/// An environment's state directory and an app tree, in a directory the build user can
/// traverse (as `/var/lib/rigger` is).
fn setup() -> (tempfile::TempDir, EnvPaths, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let paths = EnvPaths::for_root_for_tests(&dir.path().join("env"));
    let app = dir.path().join("app");
    fs::create_dir(&app).unwrap();
    (dir, paths, app)
}

#[tokio::test]
async fn requirements_leading_outside_the_app_are_refused() {
    let (dir, paths, app) = setup();
    fs::write(dir.path().join("outside.txt"), "").unwrap();
    symlink("../outside.txt", app.join("requirements.txt")).unwrap();
    fs::create_dir(app.join("deploy")).unwrap();
    symlink(dir.path(), app.join("deploy/up")).unwrap();

    for given in [
        "requirements.txt",
        "../outside.txt",
        "deploy/up/outside.txt",
    ] {
        let error = ensure_venv(&paths, &app, Path::new(given))
            .await
            .unwrap_err();
        let message = format!("{error:#}");
        assert!(
            message.contains("lead outside the app"),
            "{given}: {message}"
        );
        assert!(
            message.contains("project.requirements"),
            "{given}: {message}"
        );
    }
    assert!(!paths.venvs().exists(), "a venv was started anyway");
}

#[tokio::test]
async fn concurrent_builders_build_a_venv_once_and_leave_it_read_only() {
    let (_dir, paths, app) = setup();
    fs::write(app.join("requirements.txt"), "# nothing to install\n").unwrap();

    let requirements = Path::new("requirements.txt");
    let (first, second) = tokio::join!(
        ensure_venv(&paths, &app, requirements),
        ensure_venv(&paths, &app, requirements)
    );
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(first, second);
    assert!(first.join("bin/python").exists());
    let log = fs::read_to_string(paths.venvs().join("install.log")).unwrap();
    assert_eq!(
        log.matches(" -m venv ").count(),
        1,
        "the venv was built more than once:\n{log}"
    );
    // Root's (rigger's) and nobody else's to change.
    for entry in [first.clone(), first.join("bin"), first.join("pyvenv.cfg")] {
        let metadata = fs::symlink_metadata(&entry).unwrap();
        assert_eq!(metadata.uid(), geteuid().as_raw(), "{}", entry.display());
        assert_eq!(metadata.mode() & 0o022, 0, "{}", entry.display());
    }
    // A later call finds it complete and builds nothing.
    ensure_venv(&paths, &app, requirements).await.unwrap();
    let again = fs::read_to_string(paths.venvs().join("install.log")).unwrap();
    assert_eq!(again.matches(" -m venv ").count(), 1);
}

#[tokio::test]
async fn pip_runs_as_the_build_user_not_as_root() {
    if !geteuid().is_root() {
        eprintln!("skipped: rigger builds as the build user only when it is root");
        return;
    }
    let (dir, paths, app) = setup();
    // A file only root can read, which the requirements include: pip reads it only as root.
    let private = dir.path().join("private");
    fs::create_dir(&private).unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(private.join("roots.txt"), "").unwrap();
    fs::write(
        app.join("requirements.txt"),
        format!("-r {}\n", private.join("roots.txt").display()),
    )
    .unwrap();

    let error = ensure_venv(&paths, &app, Path::new("requirements.txt"))
        .await
        .unwrap_err();
    let log = fs::read_to_string(paths.venvs().join("install.log")).unwrap();
    assert!(
        log.contains("Permission denied"),
        "pip read a root-only file: {error:#}\n{log}"
    );
    assert!(
        nix::unistd::User::from_name(&build_user_name())
            .unwrap()
            .is_some()
    );
}
