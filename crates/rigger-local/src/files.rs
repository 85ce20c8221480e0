//! Files rigger itself writes in an environment's state directory: private by default.
//!
//! The state directory holds secrets, the app's settings and logs that may quote them, so
//! nothing rigger writes there for itself is readable by another local user: its records
//! and logs are created 0600 (before any byte is written, not chmod-ed after), its own
//! directories 0700. The environment's root is 0711: service users must traverse it to reach
//! their server's directory, but cannot list it.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

/// Mode of an environment's root directory: traversable, not listable, by service users.
pub const ROOT_MODE: u32 = 0o711;

/// Creates `dir` (and its parents) if needed and gives it `mode`, whatever the umask.
pub fn create_dir_with_mode(dir: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// A directory only root (rigger) can enter.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    create_dir_with_mode(dir, 0o700)
}

/// Opens `path` for appending, creating it 0600; an existing file is made 0600 too (an older
/// rigger created its logs 0644).
pub fn open_private_log(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// Writes `bytes` to a temporary file beside `path` (created 0600) and renames it over
/// `path`, so readers never see half a file and a crash leaves either the old or the new one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // One temporary name per call, not per process: two threads of one process writing the
    // same file at once each rename their own (the lab's runner starting machines together
    // removed each other's and one failed with "No such file or directory").
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let write = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temporary = path.with_extension(format!("tmp-{}-{write}", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, path)
}

/// Appends `record` as one JSON line to the history at `path` and syncs it. A record torn by
/// a crash in the middle of an append (the file does not end with a newline) never
/// completed: it is cut off first, so this one starts on a line of its own.
pub fn append_record(path: &Path, record: &impl serde::Serialize) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut file = open_private_log(path).with_context(|| format!("opening {}", path.display()))?;
    let existing = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if !existing.is_empty() && !existing.ends_with(b"\n") {
        let complete = existing
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        tracing::warn!(path = %path.display(), "cutting off a record torn by a crash");
        file.set_len(complete as u64)?;
    }
    writeln!(file, "{}", serde_json::to_string(record)?)?;
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

/// The records of the history at `path`, oldest first; none when there is no file. An
/// unterminated last line is an append a crash cut short (ignored: it never completed); any
/// other line that is not a record is an error naming the file and line, saying it is not
/// `a_record` and what to do (`what_to_do`), never skipped.
pub fn read_records<T: serde::de::DeserializeOwned>(
    path: &Path,
    a_record: &str,
    what_to_do: &str,
) -> anyhow::Result<Vec<T>> {
    use anyhow::Context as _;
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    };
    let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
    let mut records = Vec::new();
    for (index, line) in complete.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(line).map_err(|error| {
            anyhow::anyhow!(
                "{}:{}: not {a_record} ({error}); {what_to_do}",
                path.display(),
                index + 1
            )
        })?;
        records.push(record);
    }
    Ok(records)
}

/// Where a damaged file rigger wrote is set aside (`request.json.damaged`): kept for whoever
/// looks into it, out of the way of the next one.
pub fn damaged_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".damaged");
    name.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn writers_of_one_file_in_one_process_at_once_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("generator");
        std::thread::scope(|scope| {
            let writers: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| {
                        (0..50)
                            .map(|_| write_atomically(&file, b"same bytes"))
                            .collect::<Result<Vec<()>, _>>()
                    })
                })
                .collect();
            for writer in writers {
                writer.join().unwrap().unwrap();
            }
        });
        assert_eq!(std::fs::read(&file).unwrap(), b"same bytes");
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn records_and_logs_are_private_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let record = dir.path().join("status.json");
        write_atomically(&record, b"{}").unwrap();
        let log = dir.path().join("migrate.log");
        std::fs::write(&log, "old").unwrap();
        open_private_log(&log).unwrap();
        let private = dir.path().join("deploy");
        create_private_dir(&private).unwrap();
        nix::sys::stat::umask(old);
        assert_eq!(mode(&record), 0o600);
        assert_eq!(mode(&log), 0o600);
        assert_eq!(mode(&private), 0o700);
    }
}
