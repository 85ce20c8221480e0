//! Root putting a recipe's directories and files in place never follows a symbolic link that a
//! service user could have planted in a directory it can write: the link is refused (a
//! directory on the way) or replaced (the file itself), and what it points to is untouched.

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _, symlink};
use std::path::{Path, PathBuf};

use nix::unistd::{User, geteuid};
use rigger_local::apply::{ensure_dir, ensure_file};
use rigger_recipes::{DirSpec, FileSpec};

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// rigger's own user: the owner every file of these tests is given.
fn me() -> String {
    User::from_uid(geteuid()).unwrap().unwrap().name
}

/// A directory a service user can write: anyone can (mode 0777); as root, it also belongs to
/// `nobody`, as a service's run directory belongs to its user.
fn service_dir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    if geteuid().is_root() {
        let nobody = User::from_name("nobody").unwrap().unwrap();
        nix::unistd::chown(&dir, Some(nobody.uid), Some(nobody.gid)).unwrap();
    }
    dir
}

/// Stands for a directory of root's, such as `/etc`.
fn roots_dir(parent: &Path) -> PathBuf {
    let dir = parent.join("outside");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

fn file(path: PathBuf, contents: &str, mode: u32) -> FileSpec {
    FileSpec {
        path,
        contents: contents.into(),
        mode,
        owner: me(),
        contains_secret: false,
    }
}

#[test]
fn a_directory_swapped_for_a_link_is_refused_not_chmodded() {
    let dir = tempfile::tempdir().unwrap();
    let outside = roots_dir(dir.path());
    let service = service_dir(dir.path(), "run");
    symlink(&outside, service.join("celery")).unwrap();

    let error = ensure_dir(&DirSpec {
        path: service.join("celery"),
        mode: 0o755,
        owner: me(),
    })
    .unwrap_err();
    assert!(format!("{error:#}").contains("symbolic link"), "{error:#}");
    assert_eq!(
        mode(&outside),
        0o700,
        "root changed the mode of the link's target"
    );
}

#[test]
fn a_file_is_never_written_through_a_linked_directory() {
    let dir = tempfile::tempdir().unwrap();
    let outside = roots_dir(dir.path());
    let service = service_dir(dir.path(), "etc");
    symlink(&outside, service.join("postgresql")).unwrap();

    let error = ensure_file(&file(
        service.join("postgresql/pg_hba.conf"),
        "hostssl all all 0.0.0.0/0 trust\n",
        0o644,
    ))
    .unwrap_err();
    assert!(format!("{error:#}").contains("symbolic link"), "{error:#}");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn a_link_at_the_files_own_name_is_replaced_and_its_target_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let outside = roots_dir(dir.path());
    let shadow = outside.join("shadow");
    fs::write(&shadow, "root's\n").unwrap();
    fs::set_permissions(&shadow, fs::Permissions::from_mode(0o600)).unwrap();
    let service = service_dir(dir.path(), "app");
    symlink(&shadow, service.join("app.env")).unwrap();

    let changed = ensure_file(&file(service.join("app.env"), "A=1\n", 0o640)).unwrap();
    assert!(changed);
    assert_eq!(fs::read_to_string(&shadow).unwrap(), "root's\n");
    assert_eq!(mode(&shadow), 0o600);
    let written = fs::symlink_metadata(service.join("app.env")).unwrap();
    assert!(written.is_file());
    assert_eq!(written.mode() & 0o7777, 0o640);
    assert_eq!(written.uid(), geteuid().as_raw());
    // The same spec again changes nothing.
    assert!(!ensure_file(&file(service.join("app.env"), "A=1\n", 0o640)).unwrap());
}

#[test]
fn a_link_only_root_could_have_made_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    fs::create_dir(&real).unwrap();
    symlink(&real, dir.path().join("state")).unwrap();

    ensure_dir(&DirSpec {
        path: dir.path().join("state/servers/web-1"),
        mode: 0o750,
        owner: me(),
    })
    .unwrap();
    ensure_file(&file(
        dir.path().join("state/servers/web-1/x.conf"),
        "x\n",
        0o600,
    ))
    .unwrap();
    assert_eq!(mode(&real.join("servers/web-1")), 0o750);
    assert_eq!(
        fs::read_to_string(real.join("servers/web-1/x.conf")).unwrap(),
        "x\n"
    );
}

#[test]
fn a_file_can_be_roots_and_readable_by_a_group() {
    if !geteuid().is_root() {
        eprintln!("skipped: giving files away needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut spec = file(dir.path().join("app.env"), "SECRET=x\n", 0o640);
    spec.owner = "root:nogroup".into();
    ensure_file(&spec).unwrap();
    let metadata = fs::metadata(&spec.path).unwrap();
    let nogroup = nix::unistd::Group::from_name("nogroup").unwrap().unwrap();
    assert_eq!(
        (metadata.uid(), metadata.gid(), metadata.mode() & 0o7777),
        (0, nogroup.gid.as_raw(), 0o640)
    );
    assert!(!ensure_file(&spec).unwrap(), "rewritten although unchanged");
}
