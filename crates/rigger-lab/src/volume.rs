//! The lab's EBS volumes: real block devices that outlive machines, as volumes do.
//!
//! Each volume the emulator has gets a sparse backing file under the lab's state directory
//! (`volumes/<volume id>.img`, the volume's size), made when it is first attached and kept
//! across detaching and its instance's end, removed when the volume is deleted. While it is
//! attached to an instance whose machine runs, it is a loop device of this machine, and a
//! device node in the machine named as a Xen instance names it (`/dev/sdf` attaches as
//! `/dev/xvdf`). Two ways in:
//! - **at boot** ([`Volumes::boot_disks`]): a machine that starts (launched with a launch
//!   template's volume, started again, rebooted) gets its attached volumes' loop devices bound
//!   by `systemd-nspawn` at their names (`--bind=/dev/loopN:/dev/xvdf`), so they are there
//!   before its first unit (its fstab) runs;
//! - **hot-plugged** ([`Volumes::converge`], every second): a volume attached to a machine
//!   that is already up (rigger attaches a stand-alone server's volume after launch, and its
//!   boot script waits for the disk) gets its node made in the machine's own `/dev`
//!   (`nsenter` into its mount namespace, `mknod`).
//!
//! udev does not run in a machine, so the lab also makes the `/dev/disk/by-uuid/` link of a
//! hot-plugged disk that holds a filesystem, as udev would. The instance's root device
//! (`/dev/sda1`, `/dev/xvda`) is the machine's overlay, not a volume.
//!
//! The machines' device cgroup (v1 `devices`, where there is one) is the lab's, which allows
//! every device as its parent does: a node made in a machine is usable there.
//!
//! `rigger lab down` detaches every loop device backed by a file of this lab and removes the
//! files: the emulator's volumes end with it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rigger_aws::lab::LabVolume;

use crate::sys::run;

/// The lab's volumes and where each is plugged.
pub struct Volumes {
    dir: PathBuf,
    /// Volume id -> where it is plugged now.
    plugged: HashMap<String, Plugged>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Plugged {
    instance: String,
    /// The machine's PID 1 (as seen from here) when it was plugged: another one is a new boot.
    /// `None`: bound at boot, and that boot's PID 1 not seen yet.
    init: Option<i32>,
    /// `xvdf`.
    name: String,
    loop_device: String,
}

/// A volume bound into a machine by `systemd-nspawn` when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootDisk {
    /// `/dev/loop3`.
    pub loop_device: String,
    /// `xvdf`: the machine's `/dev/xvdf`.
    pub name: String,
}

/// What one round does with one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Keep,
    /// It was bound at boot into this boot (PID 1).
    Adopt(i32),
    /// Make its node in this boot (PID 1) of its machine, after unplugging it from elsewhere.
    Plug(i32),
    Unplug,
}

/// Where a volume goes: `current`, where it is plugged; `wanted`, the instance and device
/// name the emulator attaches it as; `machines`, each running machine's PID 1 (`None` while
/// nspawn has not started it yet).
fn step(
    current: Option<&Plugged>,
    wanted: Option<(&str, &str)>,
    machines: &HashMap<String, Option<i32>>,
) -> Step {
    let target = wanted.and_then(|(instance, _)| machines.get(instance).copied());
    match current {
        Some(now) if wanted == Some((now.instance.as_str(), now.name.as_str())) => {
            match (target, now.init) {
                (None, _) => Step::Unplug,
                // Between nspawn and its PID 1: bound at boot, or the node comes next round.
                (Some(None), _) => Step::Keep,
                (Some(Some(init)), None) => Step::Adopt(init),
                (Some(Some(init)), Some(plugged)) if init == plugged => Step::Keep,
                // Another boot, which it was not bound into.
                (Some(Some(init)), Some(_)) => Step::Plug(init),
            }
        }
        Some(now) => match (machines.get(&now.instance), target) {
            // Bound into a machine that is starting: it cannot be taken out before it is up.
            (Some(None), _) => Step::Keep,
            (_, Some(Some(init))) => Step::Plug(init),
            _ => Step::Unplug,
        },
        None => match target {
            Some(Some(init)) => Step::Plug(init),
            _ => Step::Keep,
        },
    }
}

impl Volumes {
    pub fn new(state: &Path) -> Volumes {
        Volumes {
            dir: state.join("volumes"),
            plugged: HashMap::new(),
        }
    }

    /// One round: every attached volume plugged into its instance's running machine
    /// (`machines`: instance id -> the machine's PID 1, `None` while it is starting), every
    /// other one unplugged, deleted ones' files removed.
    pub async fn converge(
        &mut self,
        volumes: &[LabVolume],
        machines: &HashMap<String, Option<i32>>,
    ) {
        let listed: HashSet<&str> = volumes.iter().map(|v| v.id.as_str()).collect();
        for volume in volumes {
            let wanted = volume.attachment.as_ref().and_then(|(instance, device)| {
                Some((instance.clone(), machine_device_name(device)?))
            });
            let current = self.plugged.get(&volume.id).cloned();
            let wanted_ref = wanted.as_ref().map(|(i, n)| (i.as_str(), n.as_str()));
            match step(current.as_ref(), wanted_ref, machines) {
                Step::Keep => {}
                Step::Adopt(init) => {
                    if let Some(plugged) = self.plugged.get_mut(&volume.id) {
                        plugged.init = Some(init);
                    }
                }
                Step::Unplug => {
                    if let Some(now) = current {
                        self.unplug(&volume.id, &now).await;
                    }
                }
                Step::Plug(init) => {
                    let (instance, name) = wanted.expect("a plug has a target");
                    if let Some(now) =
                        current.filter(|now| now.instance != instance || now.name != name)
                    {
                        self.unplug(&volume.id, &now).await;
                    }
                    match self.plug(volume, &instance, &name, init).await {
                        Ok(plugged) => {
                            tracing::info!(volume = %volume.id, %instance, device = %name,
                                loop_device = %plugged.loop_device, "volume plugged");
                            self.plugged.insert(volume.id.clone(), plugged);
                        }
                        Err(error) => tracing::warn!(volume = %volume.id, %instance,
                            error = %format!("{error:#}"), "plugging a volume"),
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
            self.unplug(&id, &plugged).await;
        }
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let Some(id) = volume_of_file(&path) else {
                    continue;
                };
                if !listed.contains(id.as_str()) && !self.plugged.contains_key(&id) {
                    detach_loops_of(&path).await;
                    if let Err(error) = std::fs::remove_file(&path) {
                        tracing::warn!(path = %path.display(), %error, "removing a deleted volume");
                    }
                }
            }
        }
    }

    async fn plug(
        &self,
        volume: &LabVolume,
        instance: &str,
        name: &str,
        init: i32,
    ) -> anyhow::Result<Plugged> {
        let loop_device = self.loop_device(volume).await?;
        let rdev = std::os::unix::fs::MetadataExt::rdev(
            &std::fs::metadata(&loop_device).with_context(|| format!("reading {loop_device}"))?,
        );
        let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
        let uuid = run(
            "blkid",
            &["-p", "-o", "value", "-s", "UUID", loop_device.as_str()],
        )
        .await
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
        // In the machine's mount namespace (its /dev is its own): the node, and the link udev
        // would make for a disk with a filesystem.
        // Not `mknod -m`: it sets the mode through /proc/self, which is the machine's /proc
        // here (another PID namespace), and fails.
        let script = "set -e; [ -b \"/dev/$1\" ] || { mknod \"/dev/$1\" b \"$2\" \"$3\"; chmod 0660 \"/dev/$1\"; }; \
             if [ -n \"$4\" ]; then mkdir -p /dev/disk/by-uuid; ln -sfn \"../../$1\" \"/dev/disk/by-uuid/$4\"; fi";
        let init_text = init.to_string();
        let (major_text, minor_text) = (major.to_string(), minor.to_string());
        run(
            "nsenter",
            &[
                "-t",
                init_text.as_str(),
                "-m",
                "--",
                "/bin/sh",
                "-c",
                script,
                "plug",
                name,
                major_text.as_str(),
                minor_text.as_str(),
                uuid.as_str(),
            ],
        )
        .await
        .with_context(|| format!("making /dev/{name} in the machine of {instance}"))?;
        Ok(Plugged {
            instance: instance.to_owned(),
            init: Some(init),
            name: name.to_owned(),
            loop_device,
        })
    }

    /// The volume's loop device: its sparse file made (the volume's size) if it has none yet,
    /// attached to a loop device unless one is already.
    async fn loop_device(&self, volume: &LabVolume) -> anyhow::Result<String> {
        crate::sys::create_trusted_dir(&self.dir, 0o700)?;
        let file = self.dir.join(format!("{}.img", volume.id));
        if !file.exists() {
            let made = std::fs::File::create(&file)
                .with_context(|| format!("creating {}", file.display()))?;
            made.set_len(u64::try_from(volume.size_gib.max(1))? << 30)?;
        }
        Ok(match loops_of(&file).into_iter().next() {
            Some(device) => device,
            None => run(
                "losetup",
                &["--find", "--show", &file.display().to_string()],
            )
            .await?
            .trim()
            .to_owned(),
        })
    }

    /// The volumes attached to `instance` as loop devices for its machine's `systemd-nspawn`
    /// to bind at their names: the machine is starting, and they are there at its first
    /// instant (its fstab mounts them, as an instance's does at boot). A volume plugged into
    /// another machine is left out (hot-plugged later, when that one lets go).
    pub async fn boot_disks(&mut self, volumes: &[LabVolume], instance: &str) -> Vec<BootDisk> {
        let mut disks = Vec::new();
        for volume in volumes {
            let Some((attached_to, device)) = &volume.attachment else {
                continue;
            };
            let Some(name) = machine_device_name(device) else {
                continue;
            };
            if attached_to != instance
                || self
                    .plugged
                    .get(&volume.id)
                    .is_some_and(|p| p.instance != instance)
            {
                continue;
            }
            match self.loop_device(volume).await {
                Ok(loop_device) => {
                    self.plugged.insert(
                        volume.id.clone(),
                        Plugged {
                            instance: instance.to_owned(),
                            init: None,
                            name: name.clone(),
                            loop_device: loop_device.clone(),
                        },
                    );
                    tracing::info!(volume = %volume.id, %instance, device = %name,
                        %loop_device, "volume bound at boot");
                    disks.push(BootDisk { loop_device, name });
                }
                Err(error) => tracing::warn!(volume = %volume.id, %instance,
                    error = %format!("{error:#}"), "a volume for a machine's boot"),
            }
        }
        disks
    }

    /// Removes the node from the machine (when it still runs the same boot) and detaches the
    /// loop device. A filesystem still mounted in the machine keeps the device busy: the
    /// detach completes when it is unmounted (`losetup -d` is lazy), as a forced detach.
    async fn unplug(&mut self, id: &str, plugged: &Plugged) {
        if let Some(init) = plugged
            .init
            .filter(|init| Path::new(&format!("/proc/{init}")).exists())
        {
            let init = init.to_string();
            let node = format!("/dev/{}", plugged.name);
            let _ = run(
                "nsenter",
                &["-t", init.as_str(), "-m", "--", "rm", "-f", node.as_str()],
            )
            .await;
        }
        let _ = run("losetup", &["-d", plugged.loop_device.as_str()]).await;
        self.plugged.remove(id);
        tracing::info!(volume = %id, instance = %plugged.instance, "volume unplugged");
    }

    /// Detaches every loop device of the lab's volumes and removes their files.
    pub async fn tear_down(&mut self) {
        self.plugged.clear();
        sweep(&self.dir).await;
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

/// The PID, as seen from here, of PID 1 of the machine whose `systemd-nspawn` is `nspawn`:
/// nspawn's child.
pub fn machine_init(nspawn: i32) -> Option<i32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries.flatten().find_map(|entry| {
        let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        let after = stat.rsplit_once(") ")?.1;
        let ppid: i32 = after.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == nspawn).then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn plugged(instance: &str, init: Option<i32>) -> Plugged {
        Plugged {
            instance: instance.to_owned(),
            init,
            name: "xvdf".to_owned(),
            loop_device: "/dev/loop7".to_owned(),
        }
    }

    #[test]
    fn a_volume_bound_at_boot_is_adopted_not_plugged_again() {
        let starting: HashMap<String, Option<i32>> = [("i-1".to_owned(), None)].into();
        let up: HashMap<String, Option<i32>> = [("i-1".to_owned(), Some(40))].into();
        let at_boot = plugged("i-1", None);
        let wanted = Some(("i-1", "xvdf"));
        assert_eq!(step(Some(&at_boot), wanted, &starting), Step::Keep);
        assert_eq!(step(Some(&at_boot), wanted, &up), Step::Adopt(40));
        assert_eq!(
            step(Some(&plugged("i-1", Some(40))), wanted, &up),
            Step::Keep
        );
        // A boot it was not bound into (its PID 1 another): hot-plugged there.
        assert_eq!(
            step(Some(&plugged("i-1", Some(39))), wanted, &up),
            Step::Plug(40)
        );
        // Attached to a machine that is up: hot-plugged; to one that is starting: not yet.
        assert_eq!(step(None, wanted, &up), Step::Plug(40));
        assert_eq!(step(None, wanted, &starting), Step::Keep);
    }

    #[test]
    fn a_volume_leaves_with_its_attachment_or_its_machine() {
        let up: HashMap<String, Option<i32>> =
            [("i-1".to_owned(), Some(40)), ("i-2".to_owned(), Some(50))].into();
        let none = HashMap::new();
        let now = plugged("i-1", Some(40));
        assert_eq!(step(Some(&now), None, &up), Step::Unplug);
        assert_eq!(step(Some(&now), Some(("i-1", "xvdf")), &none), Step::Unplug);
        assert_eq!(step(Some(&now), Some(("i-2", "xvdf")), &up), Step::Plug(50));
        // Still bound into a machine that is starting: it waits.
        let starting: HashMap<String, Option<i32>> = [("i-1".to_owned(), None)].into();
        assert_eq!(
            step(Some(&plugged("i-1", None)), None, &starting),
            Step::Keep
        );
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
}
