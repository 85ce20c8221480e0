//! What every server of an environment shares, made ready before any server starts: the state
//! directories, secrets, the certificate authority and server certificates, the app's venv
//! and the release's code.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use anyhow::Context as _;
use rigger_recipes::{Command, Secrets};

use crate::apply::{self, run_command};
use crate::environment::LocalEnvironment;

/// Shared things, ready to use.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub secrets: Secrets,
}

pub async fn prepare(env: &LocalEnvironment) -> anyhow::Result<Prepared> {
    let paths = &env.paths;
    // Service users traverse the root and `servers/` to their own server's directory but
    // cannot list them; code, static files and certificates are public to them.
    for (dir, mode) in [
        (paths.root().to_path_buf(), crate::files::ROOT_MODE),
        (paths.servers(), 0o711),
        (paths.shared(), 0o755),
        (paths.releases(), 0o755),
        (paths.venvs(), 0o755),
        (paths.pki(), 0o755),
    ] {
        crate::files::create_dir_with_mode(&dir, mode)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    ensure_traversable(paths.root())?;
    for dir in [paths.media(), paths.static_root()] {
        apply::ensure_dir(&rigger_recipes::DirSpec {
            path: dir,
            mode: 0o755,
            owner: "www-data".into(),
        })?;
    }
    let secrets = crate::secrets::load_or_generate(&paths.secrets())?;
    ensure_ca(&paths.pki(), &paths.root().join("pki.log")).await?;
    Ok(Prepared { secrets })
}

/// Service users must reach the state directory: every parent needs the search bit.
fn ensure_traversable(dir: &Path) -> anyhow::Result<()> {
    for ancestor in dir.ancestors() {
        let Ok(metadata) = std::fs::metadata(ancestor) else {
            continue;
        };
        if metadata.permissions().mode() & 0o001 == 0 {
            anyhow::bail!(
                "{} is not searchable by other users, so services running as postgres or www-data \
                 cannot reach the state directory {}; set RIGGER_STATE_DIR to a directory outside it",
                ancestor.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

fn openssl(args: &[&str]) -> Command {
    Command::new("openssl").args(args.iter().copied())
}

/// Creates the environment's CA (`ca.key`, `ca.crt` in `pki`) unless both are there. Both
/// appear together or not at all: they are made in a private scratch directory and renamed
/// into place, key first and certificate last (a key alone counts as no CA and is replaced);
/// a failure leaves no key behind.
pub async fn ensure_ca(pki: &Path, log: &Path) -> anyhow::Result<()> {
    let (cert, key) = (pki.join("ca.crt"), pki.join("ca.key"));
    if cert.exists() && key.exists() {
        return Ok(());
    }
    let scratch = Scratch::new(pki, "ca")?;
    let (new_cert, new_key) = (scratch.path().join("ca.crt"), scratch.path().join("ca.key"));
    let s = |p: &Path| p.display().to_string();
    run_command(
        &openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "3650",
            "-subj",
            "/CN=rigger environment CA",
            "-keyout",
            &s(&new_key),
            "-out",
            &s(&new_cert),
        ]),
        None,
        log,
    )
    .await
    .context("creating the environment's certificate authority")?;
    give(&new_key, None, 0o600)?;
    give(&new_cert, None, 0o644)?;
    install_pair((&new_key, &key), (&new_cert, &cert))
        .context("putting the environment's certificate authority in place")
}

/// A certificate for a server, signed by the environment's CA, valid for its id and address.
/// The key is given to `owner` with mode 0600. Key and certificate appear together: they are
/// made in a private scratch directory and renamed into place, so a failed signing leaves no
/// key (and no request) behind.
pub async fn ensure_server_certificate(
    pki: &Path,
    tls_dir: &Path,
    id: &str,
    address: Ipv4Addr,
    extra_names: &[String],
    owner: &str,
) -> anyhow::Result<()> {
    let (cert, key) = (tls_dir.join("server.crt"), tls_dir.join("server.key"));
    if cert.exists() && key.exists() {
        return Ok(());
    }
    let owner_ids = apply::owner_ids(owner)?;
    std::fs::create_dir_all(tls_dir)?;
    std::fs::set_permissions(tls_dir, std::fs::Permissions::from_mode(0o755))?;
    let log = tls_dir.join("openssl.log");
    let scratch = Scratch::new(tls_dir, "server")?;
    let (new_cert, new_key) = (
        scratch.path().join("server.crt"),
        scratch.path().join("server.key"),
    );
    let csr = scratch.path().join("server.csr");
    let extensions = scratch.path().join("server.ext");
    let mut names = vec![format!("DNS:{id}"), format!("IP:{address}")];
    names.extend(
        extra_names
            .iter()
            .map(|name| format!("DNS:{}", name.trim_start_matches('.'))),
    );
    std::fs::write(&extensions, format!("subjectAltName={}\n", names.join(",")))?;
    let s = |p: &Path| p.display().to_string();
    run_command(
        &openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={id}"),
            "-keyout",
            &s(&new_key),
            "-out",
            &s(&csr),
        ]),
        None,
        &log,
    )
    .await
    .with_context(|| format!("creating a key for {id}"))?;
    run_command(
        &openssl(&[
            "x509",
            "-req",
            "-in",
            &s(&csr),
            "-CA",
            &s(&pki.join("ca.crt")),
            "-CAkey",
            &s(&pki.join("ca.key")),
            // A random serial rather than -CAcreateserial: servers start in parallel, and a
            // shared serial file is a race.
            "-set_serial",
            &random_serial()?,
            "-days",
            "825",
            "-extfile",
            &s(&extensions),
            "-out",
            &s(&new_cert),
        ]),
        None,
        &log,
    )
    .await
    .with_context(|| format!("signing the certificate of {id}"))?;
    give(&new_key, owner_ids, 0o600)?;
    give(&new_cert, owner_ids, 0o644)?;
    install_pair((&new_key, &key), (&new_cert, &cert))
        .with_context(|| format!("putting the certificate of {id} in place"))
}

/// A private (0700) directory for making a key and its certificate, removed with whatever is
/// left in it when dropped: a failure never leaves a half-made key where it would be used.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(parent: &Path, what: &str) -> anyhow::Result<Scratch> {
        use std::os::unix::fs::DirBuilderExt as _;
        let path = parent.join(format!(".{what}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(Scratch(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Gives a file made in a [`Scratch`] its owner and mode, through its handle.
fn give(path: &Path, owner: Option<crate::safe_fs::Owner>, mode: u32) -> anyhow::Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&file, Some(uid.as_raw()), Some(gid.as_raw()))
            .with_context(|| format!("giving {} away", path.display()))?;
    }
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Renames a new key and then its certificate into place. Readers take a pair as present
/// only when both files are, so an old certificate goes first and the new one comes last (a
/// crash in between leaves a key alone, which counts as nothing); if the certificate cannot
/// be put in place, the key just placed is removed again.
fn install_pair(key: (&Path, &Path), cert: (&Path, &Path)) -> anyhow::Result<()> {
    match std::fs::remove_file(cert.1) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("replacing {}", cert.1.display()));
        }
        _ => {}
    }
    std::fs::rename(key.0, key.1).with_context(|| format!("writing {}", key.1.display()))?;
    if let Err(error) = std::fs::rename(cert.0, cert.1) {
        let _ = std::fs::remove_file(key.1);
        return Err(error).with_context(|| format!("writing {}", cert.1.display()));
    }
    Ok(())
}

/// 128 random bits as openssl's `-set_serial` wants them (hex, positive).
fn random_serial() -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    bytes[0] &= 0x7f;
    Ok(format!(
        "0x{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}
