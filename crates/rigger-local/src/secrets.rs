//! The environment's secrets: generated on the first `up`, stored one per file with mode 0600
//! in a 0700 directory, never printed or logged. Only [`names`] is for display.

use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use rigger_recipes::{Secret, Secrets};

/// Every secret a local environment has, by file name.
pub const NAMES: [&str; 6] = Secrets::NAMES;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot create the secrets directory {path}")]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write secret `{name}` in {dir}")]
    Write {
        name: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read secret `{name}` in {dir}")]
    Read {
        name: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read random bytes from /dev/urandom")]
    Random(#[source] std::io::Error),
}

/// Reads the secrets in `dir`, generating (and storing) any that are missing.
pub fn load_or_generate(dir: &Path) -> Result<Secrets, SecretsError> {
    fs::create_dir_all(dir).map_err(|source| SecretsError::Directory {
        path: dir.to_owned(),
        source,
    })?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
        SecretsError::Directory {
            path: dir.to_owned(),
            source,
        }
    })?;
    // A secret added in a later version of rigger is generated on the next `up`.
    Secrets::try_from_names(|name| {
        let path = dir.join(name);
        let value = match fs::read_to_string(&path) {
            Ok(value) if !value.trim().is_empty() => value.trim().to_owned(),
            Ok(_) => store(dir, name)?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => store(dir, name)?,
            Err(source) => {
                return Err(SecretsError::Read {
                    name: name.to_owned(),
                    dir: dir.to_owned(),
                    source,
                });
            }
        };
        Ok(Secret::new(value))
    })
}

/// The names of the secrets stored in `dir` (never their values).
pub fn names(dir: &Path) -> Vec<String> {
    NAMES
        .iter()
        .filter(|name| dir.join(name).is_file())
        .map(|name| (*name).to_owned())
        .collect()
}

/// Generates a secret and writes it atomically: created 0600 under a temporary name, then
/// renamed, so a crash never leaves a half-written or world-readable secret.
fn store(dir: &Path, name: &str) -> Result<String, SecretsError> {
    let value = generate()?;
    let write_error = |source| SecretsError::Write {
        name: name.to_owned(),
        dir: dir.to_owned(),
        source,
    };
    let temporary = dir.join(format!(".{name}.tmp"));
    let _ = fs::remove_file(&temporary);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(write_error)?;
    file.write_all(value.as_bytes()).map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    fs::rename(&temporary, dir.join(name)).map_err(write_error)?;
    Ok(value)
}

/// 32 random bytes as 32 URL-safe characters (192 bits): safe inside URLs, ini files and SQL literals
/// without quoting.
fn generate() -> Result<String, SecretsError> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bytes = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(SecretsError::Random)?;
    // Letters and digits only for the first character keeps tools that parse `-x` as a flag happy.
    let mut out: String = bytes
        .iter()
        .map(|b| ALPHABET[usize::from(b & 63)] as char)
        .collect();
    out.replace_range(0..1, &((b'a' + bytes[0] % 26) as char).to_string());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_generated_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let secrets_dir = dir.path().join("secrets");
        let first = load_or_generate(&secrets_dir).unwrap();
        let second = load_or_generate(&secrets_dir).unwrap();
        assert_eq!(first, second);
        assert_ne!(first.db_password, first.redis_password);
        assert_eq!(first.db_password.expose().len(), 32);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&secrets_dir), 0o700);
        for name in NAMES {
            assert_eq!(mode(&secrets_dir.join(name)), 0o600, "{name}");
        }
        assert_eq!(names(&secrets_dir), NAMES);
        assert!(!format!("{first:?}").contains(first.db_password.expose()));
    }
}
