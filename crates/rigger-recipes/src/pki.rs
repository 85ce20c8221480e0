//! The environment's certificates, as recipes of openssl steps: a CA (EC P-256) and, per
//! server, a key and a certificate for the server's id (DNS name) and address (IP SAN), signed
//! by that CA. Every server trusts the CA (`ca.crt` in [`Layout::pki_dir`]): stunnel and
//! replicas check PostgreSQL's certificate with it, HAProxy checks nginx's.
//!
//! Each step is guarded by `creates`, so applying again keeps existing keys. Private keys are
//! written by `openssl genpkey`, which creates them with mode 0600, into directories of mode
//! 0700 owned by root. The CA key stays where the provider runs the CA recipe (the local
//! provider: the environment's shared directory; the AWS provider: the operator's machine,
//! which signs each stand-alone server's certificate before the server exists); a server
//! recipe never needs it. A server nothing verifies by the CA (an AWS web server, whose load
//! balancer accepts any backend certificate) signs its own: [`self_signed_cert`].
//!
//! Certificates are not renewed: a server certificate lasts 825 days, the CA 10 years.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use minijinja::context;

use crate::error::RenderError;
use crate::roles::s;
use crate::{Command, DirSpec, FileSpec, Layout, Phase, Recipe, StepSpec, engine, validate};

const CA_DAYS: u32 = 3650;
const SERVER_DAYS: u32 = 825;

/// The CA's private key: `pki_dir/private/ca.key`.
pub fn ca_key(layout: &Layout) -> PathBuf {
    layout.pki_dir.join("private/ca.key")
}

/// Creates the environment CA in `layout.pki_dir`: `private/ca.key` and `ca.crt` with
/// subject `CN=<common_name>`.
pub fn ca(layout: &Layout, common_name: &str) -> Result<Recipe, RenderError> {
    validate::name_id("pki.common_name", common_name)?;
    validate::safe_path("pki_dir", &layout.pki_dir)?;
    let openssl = s(&layout.bins.openssl);
    let dir = &layout.pki_dir;
    let key = ca_key(layout);
    let cert = layout.ca_cert();
    let cnf = dir.join("ca.cnf");
    let contents = engine::render("openssl-ca.cnf", context! { common_name })?;
    Ok(Recipe {
        dirs: vec![
            dir_spec(dir.clone(), 0o755),
            dir_spec(dir.join("private"), 0o700),
        ],
        files: vec![file_spec(cnf.clone(), contents)],
        services: Vec::new(),
        steps: vec![
            step("pki-ca-key", genpkey(&openssl, &key), &key),
            step(
                "pki-ca-cert",
                Command::new(&openssl)
                    .args(["req", "-x509", "-new", "-config", &s(&cnf)])
                    .args(["-key", &s(&key), "-sha256"])
                    .args(["-days", &CA_DAYS.to_string(), "-out", &s(&cert)]),
                &cert,
            ),
        ],
    })
}

/// Creates this server's key and certificate in `layout.tls_dir` (`server.key`,
/// `server.crt`), for DNS name `name` and IP address `address`, signed by the CA of
/// `layout.pki_dir` (whose key must be there when the steps run).
pub fn server_cert(layout: &Layout, name: &str, address: Ipv4Addr) -> Result<Recipe, RenderError> {
    validate::safe_path("pki_dir", &layout.pki_dir)?;
    leaf_cert(layout, name, address, |x509| {
        x509.args(["-CA", &s(&layout.ca_cert()), "-CAkey", &s(&ca_key(layout))])
    })
}

/// Like [`server_cert`], but the certificate is signed with its own key: for a server whose
/// clients do not check it against the CA, so that the server never needs the CA's key. It
/// verifies against itself (`openssl verify -CAfile server.crt server.crt`).
pub fn self_signed_cert(
    layout: &Layout,
    name: &str,
    address: Ipv4Addr,
) -> Result<Recipe, RenderError> {
    let key = layout.tls_key();
    leaf_cert(layout, name, address, |x509| {
        x509.args(["-signkey", &s(&key)])
    })
}

/// The key, request and certificate steps of a server certificate; `signer` adds the
/// signing arguments to `openssl x509 -req`.
fn leaf_cert(
    layout: &Layout,
    name: &str,
    address: Ipv4Addr,
    signer: impl FnOnce(Command) -> Command,
) -> Result<Recipe, RenderError> {
    validate::name_id("pki.name", name)?;
    validate::safe_path("tls_dir", &layout.tls_dir)?;
    let openssl = s(&layout.bins.openssl);
    let dir = &layout.tls_dir;
    let key = layout.tls_key();
    let cert = layout.tls_cert();
    let csr = dir.join("server.csr");
    let cnf = dir.join("server.cnf");
    let contents = engine::render(
        "openssl-leaf.cnf",
        context! { name, address => address.to_string() },
    )?;
    let x509 = signer(Command::new(&openssl).args(["x509", "-req", "-in", &s(&csr)]));
    Ok(Recipe {
        dirs: vec![dir_spec(dir.clone(), 0o700)],
        files: vec![file_spec(cnf.clone(), contents)],
        services: Vec::new(),
        steps: vec![
            step("pki-server-key", genpkey(&openssl, &key), &key),
            step(
                "pki-server-csr",
                Command::new(&openssl)
                    .args(["req", "-new", "-config", &s(&cnf)])
                    .args(["-key", &s(&key), "-out", &s(&csr)]),
                &csr,
            ),
            step(
                "pki-server-cert",
                x509.args(["-extfile", &s(&cnf), "-extensions", "leaf", "-sha256"])
                    .args(["-days", &SERVER_DAYS.to_string(), "-out", &s(&cert)]),
                &cert,
            ),
        ],
    })
}

fn genpkey(openssl: &str, key: &std::path::Path) -> Command {
    Command::new(openssl)
        .args(["genpkey", "-algorithm", "EC"])
        .args(["-pkeyopt", "ec_paramgen_curve:P-256"])
        .args(["-out", &s(key)])
}

fn step(name: &str, command: Command, creates: &std::path::Path) -> StepSpec {
    StepSpec {
        name: name.to_owned(),
        command,
        phase: Phase::BeforeStart,
        creates: Some(creates.to_path_buf()),
        stdin_file: None,
        retry: None,
    }
}

fn dir_spec(path: PathBuf, mode: u32) -> DirSpec {
    DirSpec {
        path,
        mode,
        owner: "root".into(),
    }
}

fn file_spec(path: PathBuf, contents: String) -> FileSpec {
    FileSpec {
        path,
        contents,
        mode: 0o644,
        owner: "root".into(),
        contains_secret: false,
    }
}
