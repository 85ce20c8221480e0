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
    for dir in [
        paths.root().to_path_buf(),
        paths.servers(),
        paths.shared(),
        paths.releases(),
        paths.venvs(),
        paths.pki(),
    ] {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
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

async fn ensure_ca(pki: &Path, log: &Path) -> anyhow::Result<()> {
    let (cert, key) = (pki.join("ca.crt"), pki.join("ca.key"));
    if cert.exists() && key.exists() {
        return Ok(());
    }
    let (cert_s, key_s) = (cert.display().to_string(), key.display().to_string());
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
            &key_s,
            "-out",
            &cert_s,
        ]),
        None,
        log,
    )
    .await
    .context("creating the environment's certificate authority")?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    std::fs::set_permissions(&cert, std::fs::Permissions::from_mode(0o644))?;
    Ok(())
}

/// A certificate for a server, signed by the environment's CA, valid for its id and address.
/// The key is given to `owner` with mode 0600.
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
    std::fs::create_dir_all(tls_dir)?;
    std::fs::set_permissions(tls_dir, std::fs::Permissions::from_mode(0o755))?;
    let log = tls_dir.join("openssl.log");
    let csr = tls_dir.join("server.csr");
    let extensions = tls_dir.join("server.ext");
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
            &s(&key),
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
            &s(&cert),
        ]),
        None,
        &log,
    )
    .await
    .with_context(|| format!("signing the certificate of {id}"))?;
    let _ = std::fs::remove_file(&csr);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    std::fs::set_permissions(&cert, std::fs::Permissions::from_mode(0o644))?;
    if apply::is_root() {
        let user = nix::unistd::User::from_name(owner)?
            .with_context(|| format!("user `{owner}` does not exist"))?;
        nix::unistd::chown(&key, Some(user.uid), Some(user.gid))?;
        nix::unistd::chown(&cert, Some(user.uid), Some(user.gid))?;
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
