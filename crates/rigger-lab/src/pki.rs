//! The lab's certificates: a certificate authority of the lab's own, and the certificate the
//! lab's front ([`crate::front`]) presents for the AWS API's host names inside machines.
//!
//! Debian 12's AWS CLI (2.9) ignores every endpoint variable, so rigger's boot scripts call the
//! real host names (`ssm.<region>.amazonaws.com`, `<bucket>.s3.<region>.amazonaws.com`) over
//! TLS. Inside the lab those names resolve to the front ([`crate::dns`]), which must then
//! prove them with a certificate the machines trust: one issued by this CA, which every machine
//! trusts from its first boot ([`trust_in_machine`]).
//!
//! The CA is made once per lab state directory (`<state>/pki/`, 0700; its key 0600) with the
//! `openssl` command and never leaves it: machines get its certificate only. The front's
//! certificate is issued again at every start of the runner (the names depend on the lab's
//! region; it takes milliseconds). Both are ECDSA P-256.
//!
//! A CA whose key sits in a root-only directory on the operator's machine, trusted only by the
//! lab's machines, makes nobody else trust anything: this machine's own trust store is never
//! touched.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::layout::Lab;
use crate::sys;

/// How long the CA is valid (it lives as long as the lab's state directory).
const CA_DAYS: &str = "3650";
/// How long the front's certificate is valid (it is issued again at every start).
const LEAF_DAYS: &str = "397";
/// Marks the lab's CA in a machine's certificate bundles.
const BUNDLE_MARKER: &str = "# rigger lab CA (crates/rigger-lab/src/pki.rs)";
/// Where a machine keeps local CAs (`update-ca-certificates` adds them to its bundle).
const LOCAL_CA_FILE: &str = "usr/local/share/ca-certificates/rigger-lab-ca.crt";
/// The bundles a machine's TLS clients read: OpenSSL's (curl, Python's ssl) and the one the
/// AWS CLI carries (Debian's awscli uses botocore's own `cacert.pem` unless python3-certifi
/// is installed, whose `where()` Debian points at the system bundle).
const BUNDLES: &[&str] = &[
    "etc/ssl/certs/ca-certificates.crt",
    "usr/lib/python3/dist-packages/awscli/botocore/cacert.pem",
];

/// The lab's certificate files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// The certificates of `lab` (nothing is made yet).
    pub fn of(lab: &Lab) -> Pki {
        Pki {
            dir: lab.state.join("pki"),
        }
    }

    /// The CA's certificate (PEM): what machines trust.
    pub fn ca_certificate(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// The front's certificate (PEM).
    pub fn front_certificate(&self) -> PathBuf {
        self.dir.join("front.crt")
    }

    /// The front's key (PEM, PKCS#8).
    pub fn front_key(&self) -> PathBuf {
        self.dir.join("front.key")
    }

    /// Makes the CA if this lab has none yet.
    pub fn ensure_ca(&self, lab_id: &str) -> anyhow::Result<()> {
        sys::create_trusted_dir(&self.dir, 0o700)?;
        if self.ca_key().is_file() && self.ca_certificate().is_file() {
            return Ok(());
        }
        let subject = format!("/CN=rigger lab {lab_id} CA");
        openssl(&[
            "req".as_ref(),
            "-x509".as_ref(),
            "-new".as_ref(),
            "-newkey".as_ref(),
            "ec".as_ref(),
            "-pkeyopt".as_ref(),
            "ec_paramgen_curve:prime256v1".as_ref(),
            "-nodes".as_ref(),
            "-keyout".as_ref(),
            self.ca_key().as_os_str(),
            "-out".as_ref(),
            self.ca_certificate().as_os_str(),
            "-days".as_ref(),
            CA_DAYS.as_ref(),
            "-subj".as_ref(),
            subject.as_ref(),
            "-addext".as_ref(),
            "basicConstraints=critical,CA:TRUE,pathlen:0".as_ref(),
            "-addext".as_ref(),
            "keyUsage=critical,keyCertSign,cRLSign".as_ref(),
        ])
        .context("making the lab's CA")?;
        private(&self.ca_key())
    }

    /// Issues the front's certificate for the AWS host names of `region`
    /// ([`aws_host_names`]), replacing the last one.
    pub fn issue_front_certificate(&self, region: &str) -> anyhow::Result<()> {
        let names: Vec<String> = aws_host_names(region)?
            .into_iter()
            .map(|name| format!("DNS:{name}"))
            .collect();
        self.issue(
            &self.front_certificate(),
            &self.front_key(),
            "amazonaws.com",
            &names,
        )
        .context("issuing the lab front's certificate")
    }

    /// Issues a server certificate of the lab's CA for `alt_names` (`DNS:name`, `IP:address`)
    /// into `certificate` and `key` (0600), replacing the last one.
    pub fn issue(
        &self,
        certificate: &Path,
        key: &Path,
        common_name: &str,
        alt_names: &[String],
    ) -> anyhow::Result<()> {
        let alt_names = alt_names.join(",");
        let subject = format!("/CN={common_name}");
        let alt_names = format!("subjectAltName={alt_names}");
        openssl(&[
            "req".as_ref(),
            "-x509".as_ref(),
            "-new".as_ref(),
            "-newkey".as_ref(),
            "ec".as_ref(),
            "-pkeyopt".as_ref(),
            "ec_paramgen_curve:prime256v1".as_ref(),
            "-nodes".as_ref(),
            "-keyout".as_ref(),
            key.as_os_str(),
            "-out".as_ref(),
            certificate.as_os_str(),
            "-days".as_ref(),
            LEAF_DAYS.as_ref(),
            "-subj".as_ref(),
            subject.as_ref(),
            "-CA".as_ref(),
            self.ca_certificate().as_os_str(),
            "-CAkey".as_ref(),
            self.ca_key().as_os_str(),
            "-addext".as_ref(),
            alt_names.as_ref(),
            "-addext".as_ref(),
            "basicConstraints=critical,CA:FALSE".as_ref(),
            "-addext".as_ref(),
            "keyUsage=critical,digitalSignature".as_ref(),
            "-addext".as_ref(),
            "extendedKeyUsage=serverAuth".as_ref(),
        ])?;
        private(key)
    }

    /// The TLS configuration of the front: its certificate and the CA's, its key, with the
    /// crypto provider the AWS SDK's rustls already uses (ring).
    pub fn front_tls(&self) -> anyhow::Result<std::sync::Arc<rustls::ServerConfig>> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut chain = Vec::new();
        for path in [self.front_certificate(), self.ca_certificate()] {
            let certificate = CertificateDer::from_pem_file(&path)
                .with_context(|| format!("reading the certificate {}", path.display()))?;
            chain.push(certificate);
        }
        let key = PrivateKeyDer::from_pem_file(self.front_key())
            .with_context(|| format!("reading the key {}", self.front_key().display()))?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("the front's TLS versions")?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context("the front's certificate and key do not go together")?;
        Ok(std::sync::Arc::new(config))
    }
}

/// The host names the AWS CLI and SDKs call for `region`, as the front's certificate names
/// them. Measured with Debian 12's awscli 2.9.19 (`--debug`): `ssm.<region>.amazonaws.com`,
/// `ec2.<region>.amazonaws.com`, `sts.<region>.amazonaws.com`, S3 virtual-hosted style
/// `<bucket>.s3.<region>.amazonaws.com` (us-east-1 too), path style
/// `s3.<region>.amazonaws.com/<bucket>` for bucket names with dots. IAM and the legacy global
/// S3 names are `*.amazonaws.com`, `s3.amazonaws.com` and `<bucket>.s3.amazonaws.com`. A
/// wildcard matches one label only, hence one per level.
pub fn aws_host_names(region: &str) -> anyhow::Result<Vec<String>> {
    let valid = !region.is_empty()
        && region.len() <= 32
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !region.starts_with('-')
        && !region.ends_with('-');
    if !valid {
        bail!("{region:?} is not an AWS region name (like us-east-1)");
    }
    Ok(vec![
        "*.amazonaws.com".to_owned(),
        format!("*.{region}.amazonaws.com"),
        "s3.amazonaws.com".to_owned(),
        "*.s3.amazonaws.com".to_owned(),
        format!("*.s3.{region}.amazonaws.com"),
    ])
}

/// Makes the lab's CA trusted in the machine whose root filesystem is mounted at `root`: its
/// certificate among the local CAs and appended to each certificate bundle the machine has
/// ([`BUNDLES`]), once. Call it only before the machine first boots: until then everything
/// under `root` is the image's and the lab's (afterwards its root user could have put links
/// there); links are not followed even so.
pub fn trust_in_machine(ca_pem: &str, root: &Path) -> anyhow::Result<()> {
    let local = root.join(LOCAL_CA_FILE);
    let parent = local.parent().expect("a file in a directory");
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    write_new(&local, ca_pem.as_bytes(), 0o644)?;
    for bundle in BUNDLES {
        let path = root.join(bundle);
        let current = match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_file() => std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
            Ok(_) => bail!(
                "{} is not a regular file; not adding the lab's CA to it",
                path.display()
            ),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => {
                return Err(error).with_context(|| format!("reading {}", path.display()));
            }
        };
        if current.contains(ca_pem.trim()) {
            continue;
        }
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let separator = if current.ends_with('\n') || current.is_empty() {
            ""
        } else {
            "\n"
        };
        write!(file, "{separator}{BUNDLE_MARKER}\n{}\n", ca_pem.trim())
            .with_context(|| format!("adding the lab's CA to {}", path.display()))?;
    }
    Ok(())
}

/// Writes `contents` to `path` with `mode`, replacing a regular file, never through a link.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_file() {
            bail!("{} is not a regular file; not replacing it", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("replacing {}", path.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// Makes a key file readable by root alone (its directory already is).
fn private(path: &Path) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// Runs `openssl` with `args`; a failure quotes what it printed.
fn openssl(args: &[&std::ffi::OsStr]) -> anyhow::Result<()> {
    let output = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running openssl (package openssl)")?;
    if !output.status.success() {
        bail!(
            "openssl {} failed ({}): {}",
            args.first().map_or("".into(), |a| a.to_string_lossy()),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_front_names_every_host_the_aws_cli_calls() {
        let names = aws_host_names("eu-west-3").unwrap();
        let matches = |host: &str| {
            names.iter().any(|name| match name.strip_prefix("*.") {
                Some(suffix) => host
                    .split_once('.')
                    .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
                None => host == name,
            })
        };
        for host in [
            "ssm.eu-west-3.amazonaws.com",
            "ec2.eu-west-3.amazonaws.com",
            "sts.eu-west-3.amazonaws.com",
            "s3.eu-west-3.amazonaws.com",
            "my-bucket.s3.eu-west-3.amazonaws.com",
            "my-bucket.s3.amazonaws.com",
            "s3.amazonaws.com",
            "iam.amazonaws.com",
        ] {
            assert!(matches(host), "{host} in {names:?}");
        }
        assert!(!matches("example.com"));
        for bad in ["", "us east 1", "-x", "US-EAST-1", "a,DNS:evil.com"] {
            assert!(aws_host_names(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_front_certificate_from_the_labs_ca_verifies_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki {
            dir: dir.path().join("pki"),
        };
        pki.ensure_ca("0123abcd").unwrap();
        let ca = std::fs::read(pki.ca_certificate()).unwrap();
        pki.ensure_ca("0123abcd").unwrap();
        assert_eq!(
            std::fs::read(pki.ca_certificate()).unwrap(),
            ca,
            "made once"
        );
        pki.issue_front_certificate("us-east-1").unwrap();
        for key in [pki.ca_key(), pki.front_key()] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let verified = Command::new("openssl")
            .args(["verify", "-x509_strict", "-purpose", "sslserver", "-CAfile"])
            .arg(pki.ca_certificate())
            .arg(pki.front_certificate())
            .output()
            .unwrap();
        assert!(
            verified.status.success(),
            "{}",
            String::from_utf8_lossy(&verified.stdout)
        );
        let text = Command::new("openssl")
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
            .arg(pki.front_certificate())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(text.contains("DNS:*.s3.us-east-1.amazonaws.com"), "{text}");
        pki.front_tls().unwrap();
    }

    #[test]
    fn a_machine_trusts_the_lab_ca_once_and_links_are_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let bundle = root.path().join(BUNDLES[0]);
        std::fs::create_dir_all(bundle.parent().unwrap()).unwrap();
        std::fs::write(
            &bundle,
            "-----BEGIN CERTIFICATE-----\nother\n-----END CERTIFICATE-----",
        )
        .unwrap();
        let ca = "-----BEGIN CERTIFICATE-----\nlab\n-----END CERTIFICATE-----\n";
        trust_in_machine(ca, root.path()).unwrap();
        trust_in_machine(ca, root.path()).unwrap();
        let text = std::fs::read_to_string(&bundle).unwrap();
        assert_eq!(text.matches("\nlab\n").count(), 1, "{text}");
        assert!(text.starts_with(
            "-----BEGIN CERTIFICATE-----\nother\n-----END CERTIFICATE-----\n# rigger lab CA"
        ));
        assert_eq!(
            std::fs::read_to_string(root.path().join(LOCAL_CA_FILE)).unwrap(),
            ca
        );
        // The AWS CLI's bundle is absent here: nothing is made for it.
        assert!(!root.path().join(BUNDLES[1]).exists());

        let elsewhere = tempfile::tempdir().unwrap();
        let target = elsewhere.path().join("target");
        std::fs::write(&target, "untouched").unwrap();
        let linked = tempfile::tempdir().unwrap();
        let bundle = linked.path().join(BUNDLES[0]);
        std::fs::create_dir_all(bundle.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&target, &bundle).unwrap();
        assert!(trust_in_machine(ca, linked.path()).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
    }
}
