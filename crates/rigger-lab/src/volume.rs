//! The lab's EBS volumes: real block devices that outlive machines, as volumes do.
//!
//! Each volume the emulator has gets a sparse backing file under the lab's state directory
//! (`volumes/<volume id>.img`, the volume's size in GiB; grown when the volume is), made when
//! the runner first sees it and kept across detaching and its instance's end, removed when the
//! volume is deleted. A volume attached as an instance's root device gets none: a machine's
//! root is its overlay disk.
//!
//! While a volume is attached to an instance whose machine runs, it is a loop device of this
//! machine and a device node in the machine named as a Xen instance names it (`/dev/sdf`
//! attaches as `/dev/xvdf`: what rigger's boot script looks for). Two ways in:
//! - **at boot** ([`Volumes::plug_at_boot`]): the runner attaches the loop devices before it
//!   starts `systemd-nspawn`, which binds each at its name ([`BootDisk`]), so the machine's
//!   fstab finds its disks from the first instant (a reboot mounts the data volume again);
//! - **hot-plugged** ([`Volumes::converge`], every second): a volume attached to a machine
//!   that is already up (rigger attaches a stand-alone server's volume after RunInstances,
//!   and its boot script waits for the disk) gets its node made in the machine's own `/dev`
//!   (`nsenter` into its mount namespace, `mknod`).
//!
//! udev does not run in a machine, so the lab makes the links udev would: each machine's
//! `/dev/disk` is a directory of the runner's, bound read-only, where a disk holding a
//! filesystem has its `by-uuid/<uuid>` link (rigger's fstab line names the filesystem's
//! UUID). The runner looks again every second, as udev does after a change: a disk formatted
//! inside gets its link a moment later.
//!
//! Detaching removes the node from the machine and detaches the loop device. A volume still
//! mounted in the machine keeps its loop device busy: the filesystem stays usable there until
//! it is unmounted (the kernel frees the loop device then), and the volume is not plugged
//! anywhere else meanwhile. That is AWS's unforced detach (the volume stays `busy` until the
//! instance lets go of it), except that the emulator already reports it `available`.
//!
//! `rigger lab down` detaches every loop device backed by a file of this lab and removes the
//! files: the emulator's volumes end with it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use rigger_aws::lab::LabVolume;

use crate::layout::Lab;
use crate::sys::run;

/// One boot of a machine: its PID 1 as seen from here, and when that process started (a pid
/// is reused only with another start time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Boot {
    pub pid: i32,
    pub start_time: u64,
}

impl Boot {
    /// Whether this boot's PID 1 still runs (the pid not reused by another process).
    fn is_current(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }
}

/// A volume bound into a machine by `systemd-nspawn` at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootDisk {
    /// `/dev/loop3`.
    pub loop_device: String,
    /// `xvdf`: the machine's `/dev/xvdf`.
    pub name: String,
}

/// The lab's volumes and where each is plugged.
pub struct Volumes {
    lab: Lab,
    dir: PathBuf,
    /// Volume id -> where it is plugged now.
    plugged: HashMap<String, Plugged>,
    /// Volume id -> the last problem logged about it (each is logged once, not every second).
    problems: HashMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Plugged {
    instance: String,
    /// The boot it is plugged into; `None` when it was bound at boot and that boot's PID 1 has
    /// not been seen yet.
    boot: Option<Boot>,
    /// `xvdf`.
    name: String,
    loop_device: String,
    /// The filesystem UUID its `by-uuid` link names, once it holds one.
    uuid: Option<String>,
}

/// What a running machine is to the volumes: `None` while its PID 1 is not seen yet (nspawn
/// is setting it up).
pub type RunningMachines = HashMap<String, Option<Boot>>;

/// What one round does with one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Nothing (also: wait, while the machine it is in is between nspawn and its PID 1).
    Keep,
    /// It was bound at boot; this is that boot.
    Adopt(Boot),
    /// Hot-plug it into this boot (after unplugging it from wherever it is).
    Plug(Boot),
    Unplug,
}

/// Where a volume goes this round: `current`, where it is plugged; `wanted`, the instance and
/// device name the emulator attaches it as.
fn step(
    current: Option<&Plugged>,
    wanted: Option<(&str, &str)>,
    machines: &RunningMachines,
) -> Step {
    let target = wanted.and_then(|(instance, _)| machines.get(instance).copied());
    match current {
        Some(now) if wanted == Some((now.instance.as_str(), now.name.as_str())) => {
            match (machines.get(&now.instance).copied(), now.boot) {
                // Its machine stopped: its namespace, and the node, are gone.
                (None, _) => Step::Unplug,
                (Some(None), _) => Step::Keep,
                (Some(Some(boot)), None) => Step::Adopt(boot),
                (Some(Some(boot)), Some(plugged)) if boot == plugged => Step::Keep,
                // A boot it was not bound into.
                (Some(Some(boot)), Some(_)) => Step::Plug(boot),
            }
        }
        Some(now) => match (machines.get(&now.instance), target) {
            // Its node cannot be removed before the machine's PID 1 is seen.
            (Some(None), _) => Step::Keep,
            (_, Some(Some(boot))) => Step::Plug(boot),
            _ => Step::Unplug,
        },
        None => match target {
            Some(Some(boot)) => Step::Plug(boot),
            _ => Step::Keep,
        },
    }
}

impl Volumes {
    pub fn new(lab: &Lab) -> Volumes {
        Volumes {
            lab: lab.clone(),
            dir: lab.state.join("volumes"),
            plugged: HashMap::new(),
            problems: HashMap::new(),
        }
    }

    /// One round: every volume has its file; every attached volume is plugged into its
    /// instance's running machine (`machines`), every other one unplugged; disks' `by-uuid`
    /// links follow their filesystems; deleted volumes' files are removed.
    pub async fn converge(&mut self, volumes: &[LabVolume], machines: &RunningMachines) {
        let listed: HashSet<&str> = volumes.iter().map(|v| v.id.as_str()).collect();
        for volume in volumes {
            if let Err(error) = self.ensure_file(volume).await {
                self.problem(&volume.id, &format!("{error:#}"));
                continue;
            }
            let wanted = attached_as(volume);
            let current = self.plugged.get(&volume.id).cloned();
            let wanted_ref = wanted.as_ref().map(|(i, n)| (i.as_str(), n.as_str()));
            match step(current.as_ref(), wanted_ref, machines) {
                Step::Keep => {}
                Step::Adopt(boot) => {
                    if let Some(plugged) = self.plugged.get_mut(&volume.id) {
                        plugged.boot = Some(boot);
                    }
                }
                Step::Unplug => {
                    if let Some(now) = current {
                        self.unplug(&volume.id, &now).await;
                    }
                }
                Step::Plug(boot) => {
                    if let Some(now) = current {
                        self.unplug(&volume.id, &now).await;
                    }
                    let (instance, name) = wanted.expect("plugged only where attached");
                    match self.plug(volume, &instance, &name, Some(boot)).await {
                        Ok(plugged) => {
                            tracing::info!(volume = %volume.id, %instance, device = %name,
                                loop_device = %plugged.loop_device, "volume hot-plugged");
                            self.problems.remove(&volume.id);
                            self.plugged.insert(volume.id.clone(), plugged);
                        }
                        Err(error) => self.problem(&volume.id, &format!("{error:#}")),
                    }
                }
            }
        }
        // Volumes the emulator no longer has: deleted.
        let gone: Vec<(String, Plugged)> = self
            .plugged
            .iter()
            .filter(|(id, _)| !listed.contains(id.as_str()))
            .map(|(id, p)| (id.clone(), p.clone()))
            .collect();
        for (id, plugged) in gone {
            if machines.get(&plugged.instance) != Some(&None) {
                self.unplug(&id, &plugged).await;
            }
        }
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let Some(id) = volume_of_file(&path) else {
                    continue;
                };
                if !listed.contains(id.as_str()) && !self.plugged.contains_key(&id) {
                    detach_loops_of(&path).await;
                    match std::fs::remove_file(&path) {
                        Ok(()) => tracing::info!(volume = %id, "volume deleted: its file removed"),
                        Err(error) => {
                            tracing::warn!(path = %path.display(), %error, "removing a deleted volume");
                        }
                    }
                    self.problems.remove(&id);
                }
            }
        }
        self.follow_filesystems().await;
    }

    /// Attaches the loop devices of the volumes attached to `instance`, whose machine is about
    /// to boot, for `systemd-nspawn` to bind ([`BootDisk`]), and writes their `by-uuid` links:
    /// the machine finds its disks before its first unit starts. A volume that cannot be
    /// plugged now (still busy in another machine) is left to [`Volumes::converge`].
    pub async fn plug_at_boot(&mut self, volumes: &[LabVolume], instance: &str) -> Vec<BootDisk> {
        let mut disks = Vec::new();
        for volume in volumes {
            let Some((attached_to, name)) = attached_as(volume) else {
                continue;
            };
            if attached_to != instance {
                continue;
            }
            if let Some(now) = self.plugged.get(&volume.id).cloned() {
                self.unplug(&volume.id, &now).await;
            }
            let plugged = match self.ensure_file(volume).await {
                Ok(()) => self.plug(volume, instance, &name, None).await,
                Err(error) => Err(error),
            };
            match plugged {
                Ok(plugged) => {
                    tracing::info!(volume = %volume.id, %instance, device = %name,
                        loop_device = %plugged.loop_device, "volume plugged at boot");
                    disks.push(BootDisk {
                        loop_device: plugged.loop_device.clone(),
                        name: plugged.name.clone(),
                    });
                    self.problems.remove(&volume.id);
                    self.plugged.insert(volume.id.clone(), plugged);
                }
                Err(error) => self.problem(&volume.id, &format!("{error:#}")),
            }
        }
        disks
    }

    /// Logs a problem with a volume once (the runner tries again every second).
    fn problem(&mut self, volume: &str, text: &str) {
        if self.problems.get(volume).map(String::as_str) != Some(text) {
            tracing::warn!(%volume, problem = %text, "volume");
            self.problems.insert(volume.to_owned(), text.to_owned());
        }
    }

    /// The volume's backing file, made (sparse) at its size, or grown to it.
    async fn ensure_file(&self, volume: &LabVolume) -> anyhow::Result<()> {
        if !has_file(volume) {
            return Ok(());
        }
        let size = u64::try_from(volume.size_gib.max(1))? << 30;
        let file = self.file(&volume.id)?;
        let current = match std::fs::metadata(&file) {
            Ok(metadata) => Some(metadata.len()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => return Err(error).with_context(|| format!("reading {}", file.display())),
        };
        if current.is_some_and(|len| len >= size) {
            return Ok(());
        }
        crate::sys::create_trusted_dir(&self.dir, 0o700)?;
        let handle = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&file)
            .with_context(|| format!("creating {}", file.display()))?;
        handle
            .set_len(size)
            .with_context(|| format!("sizing {} to {} GiB", file.display(), volume.size_gib))?;
        // A volume grown (ModifyVolume) while plugged: the loop device follows.
        for device in loops_of(&file) {
            run("losetup", &["--set-capacity", device.as_str()]).await?;
        }
        Ok(())
    }

    fn file(&self, volume: &str) -> anyhow::Result<PathBuf> {
        let file = self.dir.join(format!("{volume}.img"));
        if volume_of_file(&file).is_none() {
            bail!("{volume:?} is not a volume id");
        }
        Ok(file)
    }

    /// Attaches the volume's loop device and gives the machine its node: made in the running
    /// boot `boot`, or (`None`) left for nspawn to bind at the boot about to start.
    async fn plug(
        &self,
        volume: &LabVolume,
        instance: &str,
        name: &str,
        boot: Option<Boot>,
    ) -> anyhow::Result<Plugged> {
        let file = self.file(&volume.id)?;
        if let Some(busy) = loops_of(&file).into_iter().next() {
            bail!(
                "it is still {busy} of a machine it was detached from while mounted there: it is \
                 plugged into {instance} once unmounted there (AWS keeps such a volume busy too)"
            );
        }
        let loop_device = run(
            "losetup",
            &["--find", "--show", &file.display().to_string()],
        )
        .await?
        .trim()
        .to_owned();
        let made = async {
            if let Some(boot) = boot {
                make_node(boot, name, &loop_device).await?;
            }
            let uuid = filesystem_uuid(&loop_device).await;
            if let Some(uuid) = &uuid {
                write_link(&links_dir(&self.lab, instance), uuid, name)?;
            }
            anyhow::Ok(uuid)
        }
        .await;
        match made {
            Ok(uuid) => Ok(Plugged {
                instance: instance.to_owned(),
                boot,
                name: name.to_owned(),
                loop_device,
                uuid,
            }),
            Err(error) => {
                // No node may be left leading to a loop device that another volume may get.
                if let Some(boot) = boot {
                    remove_node(boot, name).await;
                }
                let _ = run("losetup", &["-d", loop_device.as_str()]).await;
                Err(error.context(format!("plugging {} into {instance}", volume.id)))
            }
        }
    }

    /// Removes the node from the machine (when it still runs the boot it was plugged into) and
    /// its links, and detaches the loop device. A filesystem still mounted in the machine
    /// keeps the loop device busy until it is unmounted (`losetup -d` is lazy).
    async fn unplug(&mut self, id: &str, plugged: &Plugged) {
        if let Some(boot) = plugged.boot {
            remove_node(boot, &plugged.name).await;
        }
        remove_links(&links_dir(&self.lab, &plugged.instance), &plugged.name);
        if let Err(error) = run("losetup", &["-d", plugged.loop_device.as_str()]).await {
            tracing::warn!(volume = %id, %error, "detaching a volume's loop device");
        }
        self.plugged.remove(id);
        tracing::info!(volume = %id, instance = %plugged.instance, "volume unplugged");
    }

    /// Each plugged disk's `by-uuid` link follows the filesystem it holds now (a disk
    /// formatted in the machine gets its link, as udev gives it after the change).
    async fn follow_filesystems(&mut self) {
        for plugged in self.plugged.values_mut() {
            let uuid = filesystem_uuid(&plugged.loop_device).await;
            if uuid == plugged.uuid {
                continue;
            }
            let dir = links_dir(&self.lab, &plugged.instance);
            remove_links(&dir, &plugged.name);
            if let Some(uuid) = &uuid
                && let Err(error) = write_link(&dir, uuid, &plugged.name)
            {
                tracing::warn!(error = %format!("{error:#}"), "writing a disk's by-uuid link");
                continue;
            }
            plugged.uuid = uuid;
        }
    }

    /// Detaches every loop device of the lab's volumes and removes their files.
    pub async fn tear_down(&mut self) {
        self.plugged.clear();
        sweep(&self.dir).await;
    }
}

/// The instance a volume is attached to and the name its machine gives it (`xvdf`); `None`
/// when it is not attached, or attached as a root device or at a name the lab does not take.
fn attached_as(volume: &LabVolume) -> Option<(String, String)> {
    let (instance, device) = volume.attachment.as_ref()?;
    Some((instance.clone(), machine_device_name(device)?))
}

/// Whether the volume is backed by a file: every one but one attached as a root device (the
/// machine's overlay is its root) or at a name the lab does not take.
fn has_file(volume: &LabVolume) -> bool {
    volume.attachment.is_none() || attached_as(volume).is_some()
}

/// The machine's `/dev/disk`, a directory of the runner's that nspawn binds read-only: the
/// links udev would make.
pub fn links_dir(lab: &Lab, instance_id: &str) -> PathBuf {
    lab.machine_dir(instance_id).join("dev-disk")
}

/// Makes `/dev/<name>` (the block device `loop_device`) in the machine running `boot`.
async fn make_node(boot: Boot, name: &str, loop_device: &str) -> anyhow::Result<()> {
    let rdev = std::os::unix::fs::MetadataExt::rdev(
        &std::fs::metadata(loop_device).with_context(|| format!("reading {loop_device}"))?,
    );
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    if !boot.is_current() {
        bail!("the machine rebooted meanwhile");
    }
    // In the machine's mount namespace (its /dev is its own).
    // Not `mknod -m`: it sets the mode through /proc/self, which is not this process's in
    // the machine's mount namespace.
    let script = "set -e; rm -f \"/dev/$1\"; mknod \"/dev/$1\" b \"$2\" \"$3\"; chmod 0660 \"/dev/$1\"; chgrp disk \"/dev/$1\" 2>/dev/null || true";
    let pid = boot.pid.to_string();
    let (major, minor) = (major.to_string(), minor.to_string());
    run(
        "nsenter",
        &[
            "-t",
            pid.as_str(),
            "-m",
            "--",
            "/bin/sh",
            "-c",
            script,
            "plug",
            name,
            major.as_str(),
            minor.as_str(),
        ],
    )
    .await
    .with_context(|| format!("making /dev/{name} in the machine"))?;
    Ok(())
}

/// Removes `/dev/<name>` from the machine running `boot` (the node made there, or the one
/// nspawn bound at boot), if that boot still runs.
async fn remove_node(boot: Boot, name: &str) {
    if !boot.is_current() {
        return;
    }
    let pid = boot.pid.to_string();
    let script = "umount \"/dev/$1\" 2>/dev/null; rm -f \"/dev/$1\"";
    if let Err(error) = run(
        "nsenter",
        &[
            "-t",
            pid.as_str(),
            "-m",
            "--",
            "/bin/sh",
            "-c",
            script,
            "unplug",
            name,
        ],
    )
    .await
    {
        tracing::warn!(device = %name, %error, "removing a volume's node from its machine");
    }
}

/// The UUID of the filesystem on `device`, as udev would name its link; `None` without one,
/// or when it is not a plain UUID (the machine's root writes the filesystem: its UUID never
/// becomes a path unless it is one).
async fn filesystem_uuid(device: &str) -> Option<String> {
    let output = run("blkid", &["-p", "-o", "value", "-s", "UUID", device])
        .await
        .ok()?;
    let uuid = output.trim();
    is_plain_uuid(uuid).then(|| uuid.to_owned())
}

fn is_plain_uuid(text: &str) -> bool {
    !text.is_empty() && text.len() <= 64 && text.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// `<dir>/by-uuid/<uuid>` -> `../../<name>` (resolved in the machine, where `dir` is
/// `/dev/disk`).
fn write_link(dir: &Path, uuid: &str, name: &str) -> anyhow::Result<()> {
    let by_uuid = dir.join("by-uuid");
    std::fs::create_dir_all(&by_uuid).with_context(|| format!("creating {}", by_uuid.display()))?;
    let link = by_uuid.join(uuid);
    let temporary = by_uuid.join(format!(".{uuid}.new"));
    let _ = std::fs::remove_file(&temporary);
    std::os::unix::fs::symlink(format!("../../{name}"), &temporary)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, &link).with_context(|| format!("writing {}", link.display()))
}

/// Removes the links in `<dir>/by-uuid` that lead to `name`.
fn remove_links(dir: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(dir.join("by-uuid")) else {
        return;
    };
    let target = PathBuf::from(format!("../../{name}"));
    for entry in entries.flatten() {
        if std::fs::read_link(entry.path()).is_ok_and(|t| t == target) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Detaches the loop devices backed by files under `dir` and removes the files.
pub async fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if volume_of_file(&path).is_some() {
            detach_loops_of(&path).await;
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The loop devices backed by files under `dir`, for `leftovers`.
pub fn loop_devices_under(dir: &Path) -> Vec<String> {
    backing_files()
        .into_iter()
        .filter(|(_, file)| file.starts_with(dir))
        .map(|(device, file)| format!("{device} ({})", file.display()))
        .collect()
}

async fn detach_loops_of(file: &Path) {
    for device in loops_of(file) {
        let _ = run("losetup", &["-d", device.as_str()]).await;
    }
}

/// The loop devices whose backing file is `file`.
fn loops_of(file: &Path) -> Vec<String> {
    backing_files()
        .into_iter()
        .filter(|(_, backing)| backing == file)
        .map(|(device, _)| device)
        .collect()
}

/// Every attached loop device and its backing file, from /sys.
fn backing_files() -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let backing = std::fs::read_to_string(entry.path().join("loop/backing_file")).ok()?;
            let backing = backing.trim_end_matches('\n');
            let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
            Some((format!("/dev/{name}"), PathBuf::from(backing)))
        })
        .collect()
}

/// `vol-...` from `<dir>/vol-....img`.
fn volume_of_file(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let id = name.strip_suffix(".img")?;
    let hex = id.strip_prefix("vol-")?;
    (!hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
}

/// The device a machine sees for a volume attached as `device`, as a Xen instance names it
/// (`/dev/sdf` and `/dev/xvdf` are `xvdf`); `None` for the root device (the machine's
/// overlay) or a name the lab does not take.
pub fn machine_device_name(device: &str) -> Option<String> {
    let name = device.strip_prefix("/dev/")?;
    let letters = name
        .strip_prefix("xvd")
        .or_else(|| name.strip_prefix("sd"))?;
    let letter = letters.chars().next()?;
    if !letter.is_ascii_lowercase() || letter == 'a' || letters.len() != 1 {
        return None;
    }
    Some(format!("xvd{letter}"))
}

/// Field 22 of `/proc/<pid>/stat`: when the process started.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// The boot of the machine whose `systemd-nspawn` is `nspawn`: its PID 1 (as seen from
/// here) is nspawn's child; `None` until nspawn has started it.
pub fn machine_boot(nspawn: i32) -> Option<Boot> {
    let nspawn_namespace = std::fs::read_link(format!("/proc/{nspawn}/ns/pid")).ok()?;
    let entries = std::fs::read_dir("/proc").ok()?;
    entries.flatten().find_map(|entry| {
        let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        let after = stat.rsplit_once(") ")?.1;
        let mut fields = after.split_whitespace();
        let ppid: i32 = fields.nth(1)?.parse().ok()?;
        let start_time: u64 = fields.nth(17)?.parse().ok()?;
        // Not a helper nspawn forks for a moment: the machine's PID 1 has a PID namespace of
        // its own.
        if ppid != nspawn
            || std::fs::read_link(entry.path().join("ns/pid")).ok()? == nspawn_namespace
        {
            return None;
        }
        Some(Boot { pid, start_time })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: Boot = Boot {
        pid: 100,
        start_time: 5,
    };
    const NEXT_BOOT: Boot = Boot {
        pid: 200,
        start_time: 9,
    };

    fn plugged(instance: &str, boot: Option<Boot>) -> Plugged {
        Plugged {
            instance: instance.to_owned(),
            boot,
            name: "xvdf".to_owned(),
            loop_device: "/dev/loop3".to_owned(),
            uuid: None,
        }
    }

    fn running(machines: &[(&str, Option<Boot>)]) -> RunningMachines {
        machines
            .iter()
            .map(|(id, boot)| ((*id).to_owned(), *boot))
            .collect()
    }

    #[test]
    fn an_attached_volume_is_hot_plugged_into_its_running_machine() {
        let machines = running(&[("i-a", Some(BOOT))]);
        assert_eq!(
            step(None, Some(("i-a", "xvdf")), &machines),
            Step::Plug(BOOT)
        );
        let here = plugged("i-a", Some(BOOT));
        assert_eq!(
            step(Some(&here), Some(("i-a", "xvdf")), &machines),
            Step::Keep
        );
        // Not yet: its machine is not running, or its PID 1 is not there yet.
        assert_eq!(step(None, Some(("i-a", "xvdf")), &running(&[])), Step::Keep);
        assert_eq!(
            step(None, Some(("i-a", "xvdf")), &running(&[("i-a", None)])),
            Step::Keep
        );
    }

    #[test]
    fn a_volume_bound_at_boot_is_adopted_by_that_boot_and_replugged_into_another() {
        let bound = plugged("i-a", None);
        assert_eq!(
            step(
                Some(&bound),
                Some(("i-a", "xvdf")),
                &running(&[("i-a", None)])
            ),
            Step::Keep
        );
        assert_eq!(
            step(
                Some(&bound),
                Some(("i-a", "xvdf")),
                &running(&[("i-a", Some(BOOT))])
            ),
            Step::Adopt(BOOT)
        );
        let old_boot = plugged("i-a", Some(BOOT));
        assert_eq!(
            step(
                Some(&old_boot),
                Some(("i-a", "xvdf")),
                &running(&[("i-a", Some(NEXT_BOOT))])
            ),
            Step::Plug(NEXT_BOOT)
        );
    }

    #[test]
    fn a_detached_volume_or_one_whose_machine_stopped_is_unplugged() {
        let here = plugged("i-a", Some(BOOT));
        let machines = running(&[("i-a", Some(BOOT))]);
        assert_eq!(step(Some(&here), None, &machines), Step::Unplug);
        assert_eq!(
            step(Some(&here), Some(("i-a", "xvdf")), &running(&[])),
            Step::Unplug
        );
        // Attached elsewhere: moved when that machine runs, unplugged meanwhile.
        let both = running(&[("i-a", Some(BOOT)), ("i-b", Some(NEXT_BOOT))]);
        assert_eq!(
            step(Some(&here), Some(("i-b", "xvdf")), &both),
            Step::Plug(NEXT_BOOT)
        );
        assert_eq!(
            step(Some(&here), Some(("i-b", "xvdf")), &machines),
            Step::Unplug
        );
        // Attached at another name: plugged again under it.
        assert_eq!(
            step(Some(&here), Some(("i-a", "xvdg")), &machines),
            Step::Plug(BOOT)
        );
    }

    #[test]
    fn a_volume_is_not_pulled_from_a_machine_whose_pid_1_is_not_seen_yet() {
        // Its node could not be removed from that machine's /dev.
        let bound = plugged("i-a", None);
        let booting = running(&[("i-a", None)]);
        assert_eq!(step(Some(&bound), None, &booting), Step::Keep);
        assert_eq!(
            step(Some(&bound), Some(("i-b", "xvdf")), &booting),
            Step::Keep
        );
    }

    #[test]
    fn only_plain_uuids_become_links() {
        assert!(is_plain_uuid("0883eea3-4709-40fc-aa88-e99447f8699f"));
        assert!(is_plain_uuid("1A2B-3C4D"));
        for bad in ["", "../../sda", "a/b", "x y", &"a".repeat(65)] {
            assert!(!is_plain_uuid(bad), "{bad}");
        }
    }

    #[test]
    fn links_lead_to_the_disk_and_go_with_it() {
        let dir = tempfile::tempdir().unwrap();
        write_link(dir.path(), "0883eea3", "xvdf").unwrap();
        write_link(dir.path(), "1a2b", "xvdg").unwrap();
        // Written again (a disk formatted anew keeps its name): replaced, not an error.
        write_link(dir.path(), "0883eea3", "xvdf").unwrap();
        assert_eq!(
            std::fs::read_link(dir.path().join("by-uuid/0883eea3")).unwrap(),
            Path::new("../../xvdf")
        );
        remove_links(dir.path(), "xvdf");
        assert!(!dir.path().join("by-uuid/0883eea3").exists());
        assert!(dir.path().join("by-uuid/1a2b").symlink_metadata().is_ok());
    }

    #[test]
    fn volumes_appear_as_a_xen_instance_names_them() {
        assert_eq!(machine_device_name("/dev/sdf").as_deref(), Some("xvdf"));
        assert_eq!(machine_device_name("/dev/xvdg").as_deref(), Some("xvdg"));
        for root_or_odd in [
            "/dev/sda1",
            "/dev/xvda",
            "/dev/sda",
            "sdf",
            "/dev/nvme1n1",
            "/dev/sdf1",
        ] {
            assert_eq!(machine_device_name(root_or_odd), None, "{root_or_odd}");
        }
    }

    #[test]
    fn a_root_volume_gets_no_file_and_others_do() {
        let volume = |device: Option<&str>| LabVolume {
            id: "vol-0abc".to_owned(),
            size_gib: 1,
            attachment: device.map(|d| ("i-a".to_owned(), d.to_owned())),
        };
        assert!(has_file(&volume(None)));
        assert!(has_file(&volume(Some("/dev/sdf"))));
        assert!(!has_file(&volume(Some("/dev/sda1"))));
        assert!(!has_file(&volume(Some("/dev/xvda"))));
        assert_eq!(
            attached_as(&volume(Some("/dev/sdf"))),
            Some(("i-a".to_owned(), "xvdf".to_owned()))
        );
        assert_eq!(attached_as(&volume(Some("/dev/sda1"))), None);
    }

    #[test]
    fn only_volume_files_are_the_labs() {
        assert_eq!(
            volume_of_file(Path::new("/s/volumes/vol-0abc.img")).as_deref(),
            Some("vol-0abc")
        );
        for other in [
            "/s/volumes/vol-.img",
            "/s/volumes/x.img",
            "/s/volumes/vol-0abc.tmp",
        ] {
            assert_eq!(volume_of_file(Path::new(other)), None, "{other}");
        }
    }

    #[test]
    fn a_machine_boot_is_its_nspawn_childs_in_a_pid_namespace_of_its_own() {
        // This process's children share its PID namespace: none is a machine's PID 1.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert_eq!(machine_boot(std::process::id() as i32), None);
        child.kill().unwrap();
        child.wait().unwrap();
        let me = std::process::id() as i32;
        assert!(start_time(me).is_some());
        let boot = Boot {
            pid: me,
            start_time: start_time(me).unwrap(),
        };
        assert!(boot.is_current());
        assert!(
            !Boot {
                start_time: boot.start_time + 1,
                ..boot
            }
            .is_current()
        );
    }
}
