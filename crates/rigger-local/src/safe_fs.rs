//! Creating, changing and reading files as root in places service users can write, without
//! being redirected by a symbolic link one of them planted.
//!
//! Root calling `chmod`, `chown` or `open` by path inside a directory that a service user owns
//! can be turned against root: between two calls the user swaps a name for a symbolic link to
//! `/etc/shadow`, and root changes or writes that instead. So here a path is walked one
//! component at a time from `/` with directory handles (`openat` with `O_NOFOLLOW`), and modes,
//! owners and contents are changed through the open handle (`fchmod`, `fchown`, `renameat`),
//! never by path again. A symbolic link met on the way is followed only when nobody but root
//! (or rigger's own user) could have made it: the link is theirs and it sits in a directory
//! nobody else can write, or in a sticky one such as `/tmp`. Anything else is refused with an
//! error naming the link.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, readlinkat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, geteuid, unlinkat};

/// How many symbolic links one walk may follow (Linux's own limit).
const MAX_LINKS: usize = 40;

/// An open directory, reached without following an untrusted symbolic link.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

/// The owner a file or directory is given: a user id and a group id.
pub type Owner = (Uid, Gid);

impl Dir {
    /// Opens the existing directory `path`.
    pub fn open(path: &Path) -> io::Result<Dir> {
        walk(path, false)
    }

    /// Opens directory `path`, creating what is missing of it (mode 0755 before the umask, as
    /// `mkdir -p` does).
    pub fn create(path: &Path) -> io::Result<Dir> {
        walk(path, true)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's own metadata.
    pub fn metadata(&self) -> io::Result<FileStat> {
        fstat(&self.fd).map_err(|e| self.error(e, "reading the metadata of"))
    }

    /// Gives the directory `owner` (when `Some`) and then `mode`, through its handle.
    pub fn set_owner_and_mode(&self, owner: Option<Owner>, mode: u32) -> io::Result<()> {
        if let Some((uid, gid)) = owner {
            fchown(&self.fd, Some(uid), Some(gid))
                .map_err(|e| self.error(e, "changing the owner of"))?;
        }
        fchmod(&self.fd, Mode::from_bits_truncate(mode))
            .map_err(|e| self.error(e, "changing the mode of"))
    }

    /// The contents and metadata of regular file `name` in this directory; `None` when there
    /// is none (a symbolic link, a pipe or a directory there counts as none).
    pub fn read_file(&self, name: &OsStr) -> io::Result<Option<(Vec<u8>, FileStat)>> {
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let fd = match openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ELOOP | Errno::ENXIO | Errno::EISDIR) => return Ok(None),
            Err(e) => return Err(self.child_error(e, name, "opening")),
        };
        let stat = fstat(&fd).map_err(|e| self.child_error(e, name, "reading the metadata of"))?;
        if !is_kind(&stat, SFlag::S_IFREG) {
            return Ok(None);
        }
        let mut contents = Vec::new();
        File::from(fd).read_to_end(&mut contents).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("reading {}: {e}", self.child(name).display()),
            )
        })?;
        Ok(Some((contents, stat)))
    }

    /// Replaces file `name` with `contents`, whole: written to a new temporary file beside it
    /// (created exclusively, never through a link), given `owner` and `mode` through its
    /// handle, then renamed over `name` (which replaces a link there rather than following it).
    pub fn write_file(
        &self,
        name: &OsStr,
        contents: &[u8],
        mode: u32,
        owner: Option<Owner>,
    ) -> io::Result<()> {
        let mut temporary = OsString::from(".");
        temporary.push(name);
        temporary.push(".rigger-tmp");
        match unlinkat(&self.fd, temporary.as_os_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(self.child_error(e, &temporary, "removing")),
        }
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        // Created private: the owner and mode are applied once the contents are there.
        let fd = openat(
            &self.fd,
            temporary.as_os_str(),
            flags,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| self.child_error(e, name, "writing"))?;
        let written = (|| -> io::Result<()> {
            let mut file = File::from(fd);
            file.write_all(contents)?;
            if let Some((uid, gid)) = owner {
                fchown(file.as_fd(), Some(uid), Some(gid))?;
            }
            fchmod(file.as_fd(), Mode::from_bits_truncate(mode))?;
            Ok(())
        })()
        .and_then(|()| {
            renameat(&self.fd, temporary.as_os_str(), &self.fd, name).map_err(io::Error::from)
        });
        if let Err(e) = written {
            let _ = unlinkat(&self.fd, temporary.as_os_str(), UnlinkatFlags::NoRemoveDir);
            return Err(io::Error::new(
                e.kind(),
                format!("writing {}: {e}", self.child(name).display()),
            ));
        }
        Ok(())
    }

    fn child(&self, name: &OsStr) -> PathBuf {
        self.path.join(name)
    }

    fn error(&self, errno: Errno, doing: &str) -> io::Error {
        io::Error::new(
            io::Error::from(errno).kind(),
            format!("{doing} {}: {errno}", self.path.display()),
        )
    }

    fn child_error(&self, errno: Errno, name: &OsStr, doing: &str) -> io::Error {
        io::Error::new(
            io::Error::from(errno).kind(),
            format!("{doing} {}: {errno}", self.child(name).display()),
        )
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Is `uid` root's or rigger's own?
pub fn is_trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == geteuid().as_raw()
}

/// Can nobody but root and rigger's own user add, remove or rename entries of the directory
/// described by `stat`? A sticky directory (`/tmp`) counts: there, others cannot touch the
/// entries they do not own.
pub fn only_trusted_can_write(stat: &FileStat) -> bool {
    only_trusted_can_write_mode(stat.st_uid, stat.st_mode)
}

/// [`only_trusted_can_write`] for a directory owned by `uid` with mode bits `mode`.
pub fn only_trusted_can_write_mode(uid: u32, mode: u32) -> bool {
    is_trusted_owner(uid) && (mode & 0o022 == 0 || mode & 0o1000 != 0)
}

/// Succeeds when nobody but root and rigger's own user can change what directory `dir`
/// holds: no symbolic link rigger would refuse is on the way to it, and it and every directory
/// above it can be written by them only (or are sticky). Records root trusts (pid files) are
/// kept only in such directories.
pub fn check_private(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    Dir::open(dir)?;
    let real = dir.canonicalize()?;
    for ancestor in real.ancestors() {
        let metadata = std::fs::symlink_metadata(ancestor)?;
        if !only_trusted_can_write_mode(metadata.uid(), metadata.mode()) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} can be written by users other than root and rigger's (owner uid {}, mode \
                     {:04o}), so rigger keeps no record it trusts under it",
                    ancestor.display(),
                    metadata.uid(),
                    metadata.mode() & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

fn is_kind(stat: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == kind
}

/// Opens directory `path` component by component (see the module's documentation).
fn walk(path: &Path, create: bool) -> io::Result<Dir> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let refuse = |message: String| io::Error::new(io::ErrorKind::PermissionDenied, message);
    let mut pending: VecDeque<OsString> = components(&absolute);
    let mut current = open_root()?;
    // Where `current` is, for messages.
    let mut here = PathBuf::from("/");
    let mut links = 0;
    let mut creations = 0;
    while let Some(name) = pending.pop_front() {
        let last = pending.is_empty();
        // The last directory is opened for real (its mode and owner may be changed through the
        // handle); those on the way only as a position, which needs no read permission.
        let access = if last { OFlag::O_RDONLY } else { OFlag::O_PATH };
        let flags = access | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        match openat(&current, name.as_os_str(), flags, Mode::empty()) {
            Ok(fd) => {
                current = fd;
                here = if name == ".." {
                    here.parent()
                        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
                } else {
                    here.join(&name)
                };
            }
            Err(Errno::ENOENT) if create && creations < MAX_LINKS => {
                creations += 1;
                match mkdirat(&current, name.as_os_str(), Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => pending.push_front(name),
                    Err(e) => {
                        return Err(io::Error::new(
                            io::Error::from(e).kind(),
                            format!("creating {}: {e}", here.join(&name).display()),
                        ));
                    }
                }
            }
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                let at = here.join(&name);
                let link = fstatat(&current, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(|e| {
                        io::Error::new(io::Error::from(e).kind(), format!("{}: {e}", at.display()))
                    })?;
                if !is_kind(&link, SFlag::S_IFLNK) {
                    return Err(io::Error::new(
                        io::ErrorKind::NotADirectory,
                        format!(
                            "{} is not a directory (looking for {})",
                            at.display(),
                            path.display()
                        ),
                    ));
                }
                let directory = fstat(&current).map_err(io::Error::from)?;
                if !(is_trusted_owner(link.st_uid) && only_trusted_can_write(&directory)) {
                    return Err(refuse(format!(
                        "{} is a symbolic link in {}, a directory other users can write, so rigger \
                         does not follow it (looking for {}); remove the link, or use a path without it",
                        at.display(),
                        here.display(),
                        path.display()
                    )));
                }
                links += 1;
                if links > MAX_LINKS {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("too many symbolic links looking for {}", path.display()),
                    ));
                }
                let target = PathBuf::from(readlinkat(&current, name.as_os_str())?);
                for part in components(&target).into_iter().rev() {
                    pending.push_front(part);
                }
                if target.is_absolute() {
                    current = open_root()?;
                    here = PathBuf::from("/");
                }
            }
            Err(e) => {
                return Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("opening {}: {e}", here.join(&name).display()),
                ));
            }
        }
    }
    // `/` itself was asked for: reopen it for real.
    if here == Path::new("/") && components(&absolute).is_empty() {
        current = File::open("/")?.into();
    }
    Ok(Dir {
        fd: current,
        path: absolute,
    })
}

fn open_root() -> io::Result<OwnedFd> {
    Ok(openat(
        nix::fcntl::AT_FDCWD,
        "/",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

/// The names to walk: `..` kept (resolved by the kernel against the handle), `.` dropped.
fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .filter(|name| !name.as_bytes().is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _, symlink};

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn creates_missing_directories_and_changes_them_through_the_handle() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        let handle = Dir::create(&deep).unwrap();
        handle.set_owner_and_mode(None, 0o700).unwrap();
        assert_eq!(mode(&deep), 0o700);
        assert_eq!(handle.path(), deep);
        // Opening again finds the same directory.
        assert_eq!(
            Dir::open(&deep).unwrap().metadata().unwrap().st_ino,
            std::fs::metadata(&deep).unwrap().ino()
        );
        assert!(Dir::open(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn follows_a_link_only_its_owner_and_directory_vouch_for() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        // A link in rigger's own private directory is followed.
        symlink(&real, dir.path().join("trusted")).unwrap();
        Dir::create(&dir.path().join("trusted/sub")).unwrap();
        assert!(real.join("sub").is_dir());
        // The same link in a directory anyone can write is not.
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        symlink(&real, open.join("planted")).unwrap();
        let refused = Dir::create(&open.join("planted/other")).unwrap_err();
        assert!(refused.to_string().contains("symbolic link"), "{refused}");
        assert!(!real.join("other").exists());
        // Relative links and `..` resolve against the handle.
        symlink("real/sub", dir.path().join("relative")).unwrap();
        let via = Dir::open(&dir.path().join("relative/../sub")).unwrap();
        assert_eq!(
            via.metadata().unwrap().st_ino,
            std::fs::metadata(real.join("sub")).unwrap().ino()
        );
    }

    #[test]
    fn write_file_replaces_a_link_instead_of_writing_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "keep").unwrap();
        symlink(&outside, dir.path().join("conf")).unwrap();
        let handle = Dir::open(dir.path()).unwrap();
        assert!(handle.read_file(OsStr::new("conf")).unwrap().is_none());
        handle
            .write_file(OsStr::new("conf"), b"new", 0o640, None)
            .unwrap();
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("conf")).unwrap(),
            "new"
        );
        assert_eq!(mode(&dir.path().join("conf")), 0o640);
        let (contents, stat) = handle.read_file(OsStr::new("conf")).unwrap().unwrap();
        assert_eq!(
            (contents.as_slice(), stat.st_mode & 0o7777),
            (&b"new"[..], 0o640)
        );
    }
}
