//! The environment's CA and the servers' certificates (real openssl): a key and its
//! certificate appear together or not at all, and a failed signing leaves no key behind.

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::Command;

use nix::unistd::{User, geteuid};
use rigger_local::prepare::{ensure_ca, ensure_server_certificate};

fn me() -> String {
    User::from_uid(geteuid()).unwrap().unwrap().name
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn public_key(args: &[&str]) -> String {
    let output = Command::new("openssl").args(args).output().unwrap();
    assert!(output.status.success(), "openssl {args:?}");
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn the_ca_appears_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, log) = (dir.path().join("pki"), dir.path().join("pki.log"));
    fs::create_dir(&pki).unwrap();
    // The certificate cannot be written (a directory is in its way): no key may stay.
    fs::create_dir(pki.join("ca.crt")).unwrap();
    ensure_ca(&pki, &log).await.unwrap_err();
    assert_eq!(names(&pki), ["ca.crt"]);

    // A key left alone (by an older rigger cut short) is not a CA: a matching pair replaces it.
    fs::remove_dir(pki.join("ca.crt")).unwrap();
    fs::write(pki.join("ca.key"), "half-made").unwrap();
    ensure_ca(&pki, &log).await.unwrap();
    assert_eq!(names(&pki), ["ca.crt", "ca.key"]);
    let key = pki.join("ca.key").display().to_string();
    let cert = pki.join("ca.crt").display().to_string();
    assert_eq!(
        public_key(&["pkey", "-in", &key, "-pubout"]),
        public_key(&["x509", "-in", &cert, "-noout", "-pubkey"])
    );
    assert_eq!(fs::metadata(&key).unwrap().mode() & 0o7777, 0o600);
    assert_eq!(fs::metadata(&cert).unwrap().mode() & 0o7777, 0o644);
}

#[tokio::test]
async fn a_failed_signing_leaves_no_key_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, tls) = (dir.path().join("pki"), dir.path().join("tls"));
    fs::create_dir(&pki).unwrap(); // no CA in it: signing fails
    let address = Ipv4Addr::new(127, 0, 0, 1);

    let error = ensure_server_certificate(&pki, &tls, "web-1", address, &[], &me())
        .await
        .unwrap_err();
    assert!(
        format!("{error:#}").contains("signing the certificate of web-1"),
        "{error:#}"
    );
    assert_eq!(
        names(&tls),
        ["openssl.log"],
        "a half-made key or request was left"
    );

    // With the CA, the pair appears, the key private and given to its owner.
    ensure_ca(&pki, &dir.path().join("pki.log")).await.unwrap();
    ensure_server_certificate(&pki, &tls, "web-1", address, &[], &me())
        .await
        .unwrap();
    assert_eq!(names(&tls), ["openssl.log", "server.crt", "server.key"]);
    let key = fs::metadata(tls.join("server.key")).unwrap();
    assert_eq!(
        (key.mode() & 0o7777, key.uid()),
        (0o600, geteuid().as_raw())
    );
    let verified = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(pki.join("ca.crt"))
        .arg(tls.join("server.crt"))
        .output()
        .unwrap();
    assert!(verified.status.success(), "{verified:?}");
}
