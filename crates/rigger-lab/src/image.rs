//! The lab images: Debian 12 root filesystems built once with mmdebstrap, cached outside any
//! clone under a hash of their recipe, and known to the emulator as AMIs whose ids derive from
//! that hash (so a rigger.toml naming one stays valid across `rigger lab up`s).
//!
//! There are two ([`Flavor`]): the **stock** image, what Debian's own EC2 AMI carries (a
//! bootable system with sshd, sudo, curl, Python; no AWS CLI, none of the roles' packages), on
//! which rigger's boot script installs what it needs from Debian's archive (reached through
//! the lab's package mirror, [`crate::front::Upstream::DebianArchive`]), as on AWS; and the
//! **baked** image, the stock one with every package a role's user-data installs, so a boot
//! installs nothing (what `rigger image build` makes of the stock one; built here directly so
//! tests boot fast, and the lab's default `ami`).
//!
//! A recipe ([`recipe_text`]) is everything that decides an image: the suite, the packages,
//! the units the image leaves disabled (Debian's own copies of the services rigger runs under
//! its own units), and the lab's stand-in for cloud-init (`assets/`):
//! host keys of each machine's own, the key pair's key for the default user `admin`
//! (passwordless sudo, as on Debian's EC2 images), the user-data run once at first boot with
//! its output in /var/log/cloud-init-output.log. Changing any of it changes the hash: the next
//! `rigger lab image` builds a new image beside the old ones.
//!
//! Builds hold an exclusive lock on the cache, so concurrent builders build once; a build
//! happens in a scratch directory renamed into place when complete, so a cached image is
//! always a whole one.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use rigger_engine::progress::Progress;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::layout::hex;

/// The image's default user, as on Debian's EC2 images.
pub const DEFAULT_USER: &str = "admin";

/// Debian 12.
pub const SUITE: &str = "bookworm";

/// Bumped when the build changes in a way the recipe text does not show.
const BUILD_VERSION: u32 = 1;

/// Which of the lab's two images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flavor {
    /// What Debian's EC2 AMI carries: [`STOCK_PACKAGES`].
    Stock,
    /// The stock image and every role's packages: [`ROLE_PACKAGES`].
    Baked,
}

impl Flavor {
    pub const ALL: [Flavor; 2] = [Flavor::Stock, Flavor::Baked];

    pub fn as_str(self) -> &'static str {
        match self {
            Flavor::Stock => "stock",
            Flavor::Baked => "baked",
        }
    }

    /// Every package of the image besides Debian's essential ones.
    pub fn packages(self) -> Vec<&'static str> {
        let mut packages = STOCK_PACKAGES.to_vec();
        if self == Flavor::Baked {
            packages.extend(ROLE_PACKAGES);
        }
        packages
    }

    fn describe(self) -> &'static str {
        match self {
            Flavor::Stock => "Debian 12 as Debian's EC2 AMI is, no role's packages",
            Flavor::Baked => "Debian 12 with every role's packages",
        }
    }
}

impl std::fmt::Display for Flavor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The stock image's packages besides Debian's essential ones: a bootable system with sshd,
/// as Debian's EC2 AMI has it. python3-certifi is there as on that AMI (cloud-init needs
/// python3-requests, which needs it); it also makes an AWS CLI installed later use the
/// system's trust store, where the lab's CA is, instead of the bundle it carries.
pub const STOCK_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "sudo",
    "iproute2",
    "procps",
    "less",
    "curl",
    "ca-certificates",
    "python3",
    "python3-certifi",
];

/// What rigger's user-data installs for the roles (`rigger_aws::userdata::boot_packages`),
/// baked into the baked image so a machine boots with them already there.
pub const ROLE_PACKAGES: &[&str] = &[
    "awscli",
    "openssl",
    "nftables",
    "nginx",
    "pgbouncer",
    "stunnel4",
    "postgresql-15",
    "postgresql-client",
    "python3-venv",
    "redis-server",
    "rabbitmq-server",
];

/// Units the packages enable that the image leaves off: Debian's own instances of the
/// services rigger runs under units of its own (its user-data disables them too), and
/// Erlang's port mapper, which RabbitMQ starts itself when it needs one.
pub const DISABLED_UNITS: &[&str] = &[
    "nginx.service",
    "pgbouncer.service",
    "stunnel4.service",
    "stunnel.target",
    "redis-server.service",
    "rabbitmq-server.service",
    "postgresql.service",
    "epmd.service",
    "epmd.socket",
];

/// A file the image carries for the lab.
struct ImageFile {
    path: &'static str,
    mode: u32,
    contents: &'static str,
}

const FILES: &[ImageFile] = &[
    ImageFile {
        path: "usr/local/lib/rigger-lab/instance-init",
        mode: 0o755,
        contents: include_str!("../assets/instance-init"),
    },
    ImageFile {
        path: "usr/local/lib/rigger-lab/user-data",
        mode: 0o755,
        contents: include_str!("../assets/user-data"),
    },
    ImageFile {
        path: "etc/systemd/system/lab-cloud-init.service",
        mode: 0o644,
        contents: include_str!("../assets/lab-cloud-init.service"),
    },
    ImageFile {
        path: "etc/systemd/system/lab-cloud-final.service",
        mode: 0o644,
        contents: include_str!("../assets/lab-cloud-final.service"),
    },
    ImageFile {
        path: "etc/ssh/sshd_config.d/50-rigger-lab.conf",
        mode: 0o644,
        contents: include_str!("../assets/sshd.conf"),
    },
    ImageFile {
        // The VPC resolver's address, as on EC2: the lab's resolver answers there (dns.rs).
        path: "etc/resolv.conf",
        mode: 0o644,
        contents: "nameserver 169.254.169.253\n",
    },
    ImageFile {
        // Debian's archive, as Debian's own images list it (deb822; mmdebstrap's one-line
        // sources.list is removed). In the lab these names are the lab's package mirror.
        path: "etc/apt/sources.list.d/debian.sources",
        mode: 0o644,
        contents: "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
    },
    ImageFile {
        path: "etc/hosts",
        mode: 0o644,
        contents: "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
    },
    ImageFile {
        path: "etc/sudoers.d/90-rigger-lab-admin",
        mode: 0o440,
        contents: "# rigger lab: the default user, as on Debian's EC2 images.\nadmin ALL=(ALL) NOPASSWD:ALL\n",
    },
];

/// Units of the lab's own that the image enables.
const ENABLED_UNITS: &[&str] = &["lab-cloud-init.service", "lab-cloud-final.service"];

/// dpkg leaves out documentation and translations (as Debian's container images do).
const DPKG_OPTIONS: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
];

/// The whole recipe as text: what the hash is taken of.
pub fn recipe_text(flavor: Flavor) -> String {
    let mut text = format!(
        "rigger lab image {BUILD_VERSION}\nflavor {flavor}\nsuite {SUITE}\nvariant minbase\nuser {DEFAULT_USER}\n"
    );
    for package in flavor.packages() {
        text.push_str(&format!("package {package}\n"));
    }
    for option in DPKG_OPTIONS {
        text.push_str(&format!("dpkg {option}\n"));
    }
    for unit in DISABLED_UNITS {
        text.push_str(&format!("disable {unit}\n"));
    }
    for unit in ENABLED_UNITS {
        text.push_str(&format!("enable {unit}\n"));
    }
    for file in FILES {
        text.push_str(&format!(
            "file {} {:o} {}\n{}\n",
            file.path,
            file.mode,
            file.contents.len(),
            file.contents
        ));
    }
    text
}

/// The recipe's hash (64 hex digits).
pub fn recipe_hash(flavor: Flavor) -> String {
    hex(&sha2::Sha256::digest(recipe_text(flavor).as_bytes()))
}

/// The AMI id of the image with recipe hash `hash`: `ami-` and its first 17 hex digits, the
/// form of today's AMI ids.
pub fn ami_id(hash: &str) -> String {
    format!("ami-{}", &hash[..17])
}

/// A built image, as recorded in its `image.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Image {
    pub flavor: Flavor,
    pub hash: String,
    pub ami_id: String,
    /// The AMI's name, `rigger-lab-debian-12-<12 hex digits>`.
    pub name: String,
    pub suite: String,
    pub packages: Vec<String>,
    /// Seconds since the Unix epoch.
    pub built_at: u64,
    pub build_seconds: f64,
    pub size_bytes: u64,
    /// The image's root filesystem (not recorded: the directory it was found in decides).
    #[serde(skip)]
    pub rootfs: PathBuf,
}

/// The directory of the image with `hash` in the cache at `images`.
fn image_dir(images: &Path, hash: &str) -> PathBuf {
    images.join(&hash[..16])
}

/// The cached image of the current recipe of `flavor`, if it was built.
pub fn find(images: &Path, flavor: Flavor) -> Option<Image> {
    let dir = image_dir(images, &recipe_hash(flavor));
    let text = std::fs::read_to_string(dir.join("image.json")).ok()?;
    let mut image: Image = serde_json::from_str(&text).ok()?;
    if image.hash != recipe_hash(flavor) {
        return None;
    }
    image.rootfs = dir.join("rootfs");
    image.rootfs.is_dir().then_some(image)
}

/// Whether [`build`] found the image or made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Built {
    Cached,
    Now,
}

/// The image of the current recipe of `flavor`: the cached one, or one built now (a minute or
/// two; needs root, mmdebstrap and Debian's package archive). `progress` gets one line per step.
pub fn build(
    images: &Path,
    flavor: Flavor,
    progress: &dyn Progress,
) -> anyhow::Result<(Image, Built)> {
    if let Some(image) = find(images, flavor) {
        return Ok((image, Built::Cached));
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "building the lab image needs root (mmdebstrap, chroot): run `sudo rigger lab image`"
        );
    }
    which("mmdebstrap").context(
        "mmdebstrap is not installed: `apt-get install mmdebstrap` (scripts/install-packages.sh does)",
    )?;
    crate::sys::create_trusted_dir(images, 0o755)?;
    progress.report(&format!(
        "waiting for other builds of the {flavor} lab image"
    ));
    let _lock = crate::sys::lock_exclusive(&images.join(".build.lock"))?;
    // Another builder may have finished while this one waited.
    if let Some(image) = find(images, flavor) {
        return Ok((image, Built::Cached));
    }
    let hash = recipe_hash(flavor);
    let scratch = images.join(format!(".build-{}", &hash[..16]));
    crate::sys::remove_tree(&scratch)?;
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let log_path = scratch.join("build.log");
    let started = Instant::now();
    let result = build_into(flavor, &scratch, &log_path, progress);
    if let Err(error) = result {
        let kept = images.join(format!("build-{}.log", &hash[..16]));
        let _ = std::fs::rename(&log_path, &kept);
        let _ = crate::sys::remove_tree(&scratch);
        let tail = rigger_local::process::log_tail(&kept, 20).join("\n  ");
        return Err(error.context(format!(
            "building the {flavor} lab image failed; the end of its log ({}):\n  {tail}",
            kept.display()
        )));
    }
    let rootfs = scratch.join("rootfs");
    let image = Image {
        flavor,
        ami_id: ami_id(&hash),
        name: format!("rigger-lab-debian-12-{flavor}-{}", &hash[..12]),
        hash: hash.clone(),
        suite: SUITE.to_owned(),
        packages: flavor.packages().iter().map(|p| (*p).to_owned()).collect(),
        built_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        build_seconds: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        size_bytes: tree_size(&rootfs),
        rootfs: PathBuf::new(),
    };
    let json = serde_json::to_string_pretty(&image).context("recording the image")?;
    std::fs::write(scratch.join("image.json"), json + "\n").context("writing image.json")?;
    let dir = image_dir(images, &hash);
    std::fs::rename(&scratch, &dir)
        .with_context(|| format!("moving the built image to {}", dir.display()))?;
    let image = find(images, flavor).context("the image just built cannot be read back")?;
    Ok((image, Built::Now))
}

/// mmdebstrap, then the lab's changes, into `scratch/rootfs`.
fn build_into(
    flavor: Flavor,
    scratch: &Path,
    log_path: &Path,
    progress: &dyn Progress,
) -> anyhow::Result<()> {
    let rootfs = scratch.join("rootfs");
    let log = rigger_local::files::open_private_log(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let packages = flavor.packages();
    progress.report(&format!(
        "mmdebstrap {SUITE}, the {flavor} image, with {} packages (a minute or two; log: {})",
        packages.len(),
        log_path.display()
    ));
    let mut command = Command::new("mmdebstrap");
    command
        .args(["--variant=minbase", "--mode=root", "--format=directory"])
        .arg(format!("--include={}", packages.join(",")))
        .arg("--aptopt=Acquire::Retries \"3\"");
    for option in DPKG_OPTIONS {
        command.arg(format!("--dpkgopt={option}"));
    }
    command.arg(SUITE).arg(&rootfs);
    checked(
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?),
        "mmdebstrap",
    )?;

    progress.report("adding the default user, the lab's units and files");
    let chroot = |args: &[&str]| -> anyhow::Result<()> {
        let mut command = Command::new("chroot");
        command
            .arg(&rootfs)
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?);
        checked(&mut command, &format!("chroot {}", args.join(" ")))
    };
    chroot(&[
        "useradd",
        "--create-home",
        "--shell",
        "/bin/bash",
        "--user-group",
        "--groups",
        "adm,sudo",
        "--comment",
        "Debian (rigger lab)",
        DEFAULT_USER,
    ])?;
    for file in FILES {
        let path = rootfs.join(file.path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // resolv.conf may be a link into /run: replace, never follow.
        let _ = std::fs::remove_file(&path);
        write_mode(&path, file.contents.as_bytes(), file.mode)?;
    }
    // debian.sources (above) says it all.
    let _ = std::fs::remove_file(rootfs.join("etc/apt/sources.list"));
    let present: Vec<&str> = DISABLED_UNITS
        .iter()
        .copied()
        .filter(|unit| {
            // A unit of its own, or one systemd makes of a SysV script (stunnel4).
            let script = unit.strip_suffix(".service").unwrap_or(unit);
            rootfs.join("usr/lib/systemd/system").join(unit).exists()
                || rootfs.join("etc/init.d").join(script).exists()
        })
        .collect();
    if !present.is_empty() {
        let mut args = vec!["systemctl", "disable", "--quiet"];
        args.extend(&present);
        chroot(&args)?;
    }
    let mut args = vec!["systemctl", "enable", "--quiet"];
    args.extend(ENABLED_UNITS);
    chroot(&args)?;
    // Each machine makes its own host keys, machine id and name.
    for entry in std::fs::read_dir(rootfs.join("etc/ssh")).context("reading etc/ssh")? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
            std::fs::remove_file(entry.path())?;
        }
    }
    write_mode(&rootfs.join("etc/machine-id"), b"", 0o444)?;
    let _ = std::fs::remove_file(rootfs.join("etc/hostname"));
    write_mode(
        &rootfs.join("etc/rigger-lab-image"),
        format!("{}\n", recipe_hash(flavor)).as_bytes(),
        0o644,
    )?;
    let mut log = log;
    let _ = writeln!(log, "rigger: the lab image is complete");
    Ok(())
}

fn write_mode(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

fn checked(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn which(program: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("{program} not found on PATH"))
}

/// Bytes in regular files under `dir` (each inode once), without following links.
fn tree_size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&current) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            if metadata.is_dir() {
                pending.push(entry.path());
            } else if metadata.is_file() && seen.insert(metadata.ino()) {
                total += metadata.len();
            }
        }
    }
    total
}

/// The emulator's AMI list (moto's `MOTO_AMIS_PATH`): the lab's image, in every region.
pub fn emulator_amis(images: &[&Image]) -> serde_json::Value {
    images.iter().map(|image| emulator_ami(image)).collect()
}

fn emulator_ami(image: &Image) -> serde_json::Value {
    serde_json::json!({
        "ami_id": image.ami_id,
        "name": image.name,
        "description": format!("rigger lab: {} ({SUITE}), image {}", image.flavor.describe(), &image.hash[..16]),
        "owner_id": "123456789012",
        "public": false,
        "state": "available",
        "image_location": format!("123456789012/{}", image.name),
        "architecture": "x86_64",
        "virtualization_type": "hvm",
        "hypervisor": "xen",
        "root_device_type": "ebs",
        "root_device_name": "/dev/xvda",
        "image_type": "machine",
        "sriov": "simple"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_covers_packages_units_and_files() {
        let text = recipe_text(Flavor::Baked);
        assert!(text.contains("package postgresql-15\n"));
        assert!(text.contains("disable epmd.socket\n"));
        assert!(text.contains("enable lab-cloud-final.service\n"));
        assert!(text.contains(include_str!("../assets/user-data")));
        assert_eq!(recipe_hash(Flavor::Baked).len(), 64);
        assert_eq!(recipe_hash(Flavor::Baked), recipe_hash(Flavor::Baked));
        assert_ne!(recipe_hash(Flavor::Stock), recipe_hash(Flavor::Baked));
    }

    #[test]
    fn the_stock_image_has_none_of_the_roles_packages() {
        let stock = Flavor::Stock.packages();
        let baked = Flavor::Baked.packages();
        for package in ROLE_PACKAGES {
            assert!(!stock.contains(package), "{package}");
            assert!(baked.contains(package), "{package}");
        }
        assert!(stock.iter().all(|package| baked.contains(package)));
        assert!(!recipe_text(Flavor::Stock).contains("package awscli\n"));
    }

    #[test]
    fn ami_ids_have_todays_form() {
        let id = ami_id(&recipe_hash(Flavor::Stock));
        assert_eq!(id.len(), 4 + 17);
        assert!(id.starts_with("ami-"));
        assert!(
            id[4..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }

    #[test]
    fn the_scripts_name_the_default_user() {
        assert!(
            include_str!("../assets/instance-init").contains(&format!("user=\"{DEFAULT_USER}\""))
        );
        let sudoers = FILES
            .iter()
            .find(|f| f.path.starts_with("etc/sudoers.d/"))
            .unwrap();
        assert!(
            sudoers
                .contents
                .contains(&format!("\n{DEFAULT_USER} ALL=(ALL) NOPASSWD:ALL\n"))
        );
        assert_eq!(sudoers.mode, 0o440);
    }

    #[test]
    fn every_package_rigger_installs_at_boot_is_in_the_image() {
        for package in rigger_aws::userdata::boot_packages() {
            assert!(Flavor::Baked.packages().contains(&package), "{package}");
        }
    }

    #[test]
    fn a_missing_image_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        assert!(find(dir.path(), Flavor::Stock).is_none());
        assert!(find(dir.path(), Flavor::Baked).is_none());
    }
}
