//! The few system operations the lab builds on: running a tool and reporting its failure in
//! full, directories only root can change (the lab boots what is in them as root) and locks
//! on them, the mount table (what is mounted under the lab's state), removing a directory tree
//! that may hold mount points without ever descending into one, and cgroups (one per machine,
//! so each `systemd-nspawn` gets its own, and every process of a machine can be found and
//! killed).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Runs `program` with `args` and waits; a failure names the whole command and quotes what it
/// printed.
pub async fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> anyhow::Result<String> {
    let output = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {program} (is it installed?)"))?;
    if !output.status.success() {
        let shown: Vec<String> = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        bail!(
            "`{program} {}` failed ({}): {}",
            shown.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Creates `dir` (and its parents) with `mode` if missing, then checks that nobody but root
/// can change what it holds: the lab boots images and trusts records from these directories,
/// so one that another user created first (or could write) is refused.
pub fn create_trusted_dir(dir: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", dir.display()))?;
    }
    check_trusted_dir(dir)
}

/// Checks that nobody but root can change what `dir` holds (see [`create_trusted_dir`]).
pub fn check_trusted_dir(dir: &Path) -> anyhow::Result<()> {
    rigger_local::safe_fs::check_private(dir).with_context(|| {
        format!(
            "refusing to use {}: the lab runs what it holds as root; remove it or choose another directory",
            dir.display()
        )
    })
}

/// Holds an exclusive lock on `path` (created if missing) until the returned value is
/// dropped; waits for another holder.
pub fn lock_exclusive(path: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| errno)
        .with_context(|| format!("locking {}", path.display()))
}

/// Mount points at or under `dir` in this mount namespace, deepest first (the order to
/// unmount them in).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mount_path(field)))
        .filter(|point| point.starts_with(dir))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    found.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        if let Some(digits) = octal {
            let value = digits
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            out.push(u8::try_from(value).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts `point`; when it is busy, detaches it (it disappears from the tree now and is
/// released when its last user goes).
pub fn unmount(point: &Path) -> anyhow::Result<()> {
    use nix::mount::{MntFlags, umount2};
    match umount2(point, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => Ok(()), // not mounted
        Err(nix::errno::Errno::EBUSY) => umount2(point, MntFlags::MNT_DETACH)
            .with_context(|| format!("detaching the busy mount {}", point.display())),
        Err(error) => Err(error).with_context(|| format!("unmounting {}", point.display())),
    }
}

/// Removes the tree at `dir` after unmounting whatever is mounted in it. Refuses (rather than
/// delete through a mount into another filesystem) if something stays mounted.
pub fn remove_tree(dir: &Path) -> anyhow::Result<()> {
    for point in mounts_under(dir) {
        unmount(&point)?;
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        bail!(
            "not removing {}: {} is still mounted",
            dir.display(),
            left[0].display()
        );
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).with_context(|| format!("removing {}", dir.display())),
    }
}

/// The cgroup hierarchies a machine is placed in: the unified one alone on a pure cgroup v2
/// system; on a hybrid one (this kind of machine) `name=systemd`, which systemd inside the
/// machine manages, and the unified one, which it also expects its own part of.
pub fn cgroup_roots() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return vec![base.to_path_buf()];
    }
    ["systemd", "unified"]
        .iter()
        .map(|name| base.join(name))
        .filter(|path| path.join("cgroup.procs").exists())
        .collect()
}

/// Processes in the cgroup tree at `dir` (the cgroup and all below it).
pub fn cgroup_processes(dir: &Path) -> Vec<i32> {
    let mut pids = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        if let Ok(text) = std::fs::read_to_string(current.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(&current) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    pending.push(entry.path());
                }
            }
        }
    }
    pids.into_iter().collect()
}

/// Kills every process in the cgroup tree at `dir` (SIGKILL: they belong to a machine whose
/// `systemd-nspawn` is gone, nothing is left to shut them down in order) and removes the
/// cgroups, deepest first. Waits (polling) up to `timeout` for the processes to go.
pub fn remove_cgroup_tree(dir: &Path, timeout: Duration) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let started = Instant::now();
    loop {
        let pids = cgroup_processes(dir);
        if pids.is_empty() {
            break;
        }
        if started.elapsed() > timeout {
            bail!(
                "processes {pids:?} of cgroup {} did not die after SIGKILL",
                dir.display()
            );
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut dirs = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        if let Ok(entries) = std::fs::read_dir(&current) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    pending.push(entry.path());
                }
            }
        }
        dirs.push(current);
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for cgroup in dirs {
        match std::fs::remove_dir(&cgroup) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(error).with_context(|| format!("removing cgroup {}", cgroup.display()));
            }
        }
    }
    Ok(())
}

/// The arguments of `/bin/sh` that put the shell in cgroups `groups` (one per hierarchy) and
/// then become the command appended after them (same pid), so the command and everything it
/// starts are in them from its first instruction.
pub fn enter_cgroups_args(groups: &[PathBuf]) -> Vec<String> {
    let mut args = vec![
        "-c".to_owned(),
        r#"n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ >"$1/cgroup.procs" || exit 1; shift; n=$((n - 1)); done; exec "$@""#.to_owned(),
        "sh".to_owned(),
        groups.len().to_string(),
    ];
    args.extend(groups.iter().map(|g| g.display().to_string()));
    args
}

/// Runs `work` on a thread of its own that has entered network namespace `namespace` (a name
/// under /run/netns): sockets it creates live in that namespace for good, whichever thread
/// uses them later. The rest of the process stays where it is.
pub fn in_namespace<T: Send + 'static>(
    namespace: &str,
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let path = Path::new("/run/netns").join(namespace);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path)?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|errno| io::Error::other(format!("entering {}: {errno}", path.display())))?;
        work()
    })
    .join()
    .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path(r"/trailing\04"), r"/trailing\04");
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("images");
        create_trusted_dir(&ours, 0o755).unwrap();
        assert_eq!(
            std::fs::metadata(&ours).unwrap().permissions().mode() & 0o777,
            0o755
        );
        std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = create_trusted_dir(&ours, 0o755).unwrap_err();
        assert!(
            format!("{error:#}").contains("refusing to use"),
            "{error:#}"
        );
        // Nor anything below it.
        let below = ours.join("state");
        let error = create_trusted_dir(&below, 0o700).unwrap_err();
        assert!(
            format!("{error:#}").contains("refusing to use"),
            "{error:#}"
        );
    }

    #[test]
    fn a_tree_without_mounts_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::fs::write(tree.join("a/b/file"), "x").unwrap();
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        remove_tree(&tree).unwrap();
    }
}
