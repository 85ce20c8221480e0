//! The lab's AMIs: the images it was started with, and those `CreateImage` makes of its
//! instances, which machines can boot.
//!
//! A machine's disk is an overlay of layers ([`crate::machine`]): its own `upper` above its
//! AMI's layers. The lab's images are one layer each (a root filesystem from the image cache,
//! [`crate::image`]). `CreateImage` of a stopped instance freezes that instance's `upper` as a
//! new read-only layer (a copy, under `<state>/created-images/<ami>/layer`, so the instance
//! can start again and change its disk without changing the image), and the new AMI's layers
//! are that layer above its source's: a machine launched from it boots base + layer + its own
//! upper. moto reports a created image's source instance (`sourceInstanceId` in
//! DescribeImages) and calls every image `available` at once; until its layer is complete the
//! lab's front answers `pending` for it ([`ImageEdge`]), as EC2 does while it snapshots, and an
//! image of an instance the lab cannot freeze (still running, never booted) is `failed` with
//! why. The layers live in the lab's state and go with it (`rigger lab down`); a deregistered
//! image's layer stays until then, since machines may still boot from it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, RwLock};

use anyhow::{Context as _, bail};
use rigger_aws::Clients;
use rigger_aws::lab::LabImage;

use crate::front::{Edge, EmulatorCall};
use crate::layout::{Lab, is_instance_id};

/// Where an AMI stands in the lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageState {
    /// Machines can boot it: its layers, top first.
    Ready(Vec<PathBuf>),
    /// Its layer is being made.
    Making,
    /// It cannot be booted here, and why.
    Failed(String),
}

/// The lab's AMIs, shared by the runner (which makes created images' layers and boots
/// machines from them) and the front ([`ImageEdge`]).
pub struct LabImages {
    lab: Lab,
    states: RwLock<HashMap<String, ImageState>>,
    /// Layers being copied: the AMI, and the task copying it.
    copies: std::sync::Mutex<HashMap<String, tokio::task::JoinHandle<anyhow::Result<()>>>>,
}

/// What the runner needs to know of an instance to freeze its disk.
pub struct Source<'a> {
    /// The emulator's state of the instance.
    pub instance_state: &'a str,
    /// Whether its machine is running (its disk changing).
    pub machine_running: bool,
    /// The AMI it was launched from.
    pub image_id: Option<&'a str>,
}

impl LabImages {
    /// The lab's AMIs, starting with the images it was started with: (AMI, root filesystem).
    pub fn new(lab: &Lab, bases: &[(String, PathBuf)]) -> LabImages {
        let states = bases
            .iter()
            .map(|(ami, rootfs)| (ami.clone(), ImageState::Ready(vec![rootfs.clone()])))
            .collect();
        LabImages {
            lab: lab.clone(),
            states: RwLock::new(states),
            copies: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Where `ami` stands; `None` for an AMI the lab has not seen.
    pub fn state(&self, ami: &str) -> Option<ImageState> {
        self.states.read().expect("images lock").get(ami).cloned()
    }

    fn set(&self, ami: &str, state: ImageState) {
        self.states
            .write()
            .expect("images lock")
            .insert(ami.to_owned(), state);
    }

    /// The created images' directory of `ami`.
    fn dir(&self, ami: &str) -> PathBuf {
        self.lab.created_images_dir().join(ami)
    }

    /// One round: every new image of the emulator gets its layer made (or is failed, saying
    /// why); finished copies become ready. `source` describes an instance the runner knows.
    pub async fn converge<'a>(
        &self,
        images: &[LabImage],
        source: impl Fn(&str) -> Option<Source<'a>>,
    ) {
        self.finish_copies().await;
        for image in images {
            let current = self.state(&image.id);
            if matches!(current, Some(ImageState::Ready(_) | ImageState::Failed(_))) {
                continue;
            }
            if self
                .copies
                .lock()
                .expect("copies lock")
                .contains_key(&image.id)
            {
                continue;
            }
            match self.start(image, &source) {
                Ok(true) => self.set(&image.id, ImageState::Making),
                // Waiting for its instance's machine to stop.
                Ok(false) => self.set(&image.id, ImageState::Making),
                Err(why) => {
                    tracing::warn!(ami = %image.id, %why, "the lab cannot make this image");
                    self.set(&image.id, ImageState::Failed(why));
                }
            }
        }
    }

    /// Starts copying `image`'s layer: `Ok(true)` started, `Ok(false)` not yet (its machine
    /// is still stopping), `Err` never.
    fn start<'a>(
        &self,
        image: &LabImage,
        source: &impl Fn(&str) -> Option<Source<'a>>,
    ) -> Result<bool, String> {
        let Some(instance) = image.source_instance.as_deref() else {
            return Err(
                "the lab boots only its own images and those CreateImage made of its instances"
                    .to_owned(),
            );
        };
        if !is_instance_id(instance) {
            return Err(format!(
                "its source instance {instance:?} is not an instance id"
            ));
        }
        let Some(found) = source(instance) else {
            return Err(format!(
                "its instance {instance} never ran as a machine of this lab"
            ));
        };
        if matches!(found.instance_state, "pending" | "running") {
            return Err(format!(
                "its instance {instance} was running: the lab makes images of stopped instances \
                 only (stop it first; EC2 would reboot it)"
            ));
        }
        if found.machine_running {
            return Ok(false);
        }
        let base = match found.image_id.and_then(|ami| self.state(ami)) {
            Some(ImageState::Ready(layers)) => layers,
            _ => {
                return Err(format!(
                    "its instance {instance} was launched from an image the lab cannot boot"
                ));
            }
        };
        let upper = self.lab.machine_dir(instance).join("upper");
        if !upper.is_dir() {
            return Err(format!("its instance {instance} has no disk in the lab"));
        }
        let dir = self.dir(&image.id);
        let ami = image.id.clone();
        tracing::info!(%ami, %instance, "making the image's layer");
        let task = tokio::task::spawn_blocking(move || freeze(&upper, &dir, &base));
        self.copies.lock().expect("copies lock").insert(ami, task);
        Ok(true)
    }

    /// Copies that ended: their images ready, or failed.
    async fn finish_copies(&self) {
        let finished: Vec<(String, tokio::task::JoinHandle<anyhow::Result<()>>)> = {
            let mut copies = self.copies.lock().expect("copies lock");
            let done: Vec<String> = copies
                .iter()
                .filter(|(_, task)| task.is_finished())
                .map(|(ami, _)| ami.clone())
                .collect();
            done.into_iter()
                .filter_map(|ami| copies.remove(&ami).map(|task| (ami, task)))
                .collect()
        };
        for (ami, task) in finished {
            let result = match task.await {
                Ok(result) => result,
                Err(error) => Err(anyhow::anyhow!("the copy panicked: {error}")),
            };
            match result.and_then(|()| read_layers(&self.dir(&ami))) {
                Ok(layers) => {
                    tracing::info!(%ami, "image ready");
                    self.set(&ami, ImageState::Ready(layers));
                }
                Err(error) => {
                    let why = format!("making its layer failed: {error:#}");
                    tracing::warn!(%ami, %why, "image failed");
                    self.set(&ami, ImageState::Failed(why));
                }
            }
        }
    }
}

/// The layers file of a created image: its layers, top first, one path a line.
const LAYERS_FILE: &str = "layers";

/// Copies `upper` (a stopped machine's layer: files, whiteouts, overlay attributes) to
/// `dir/layer`, then records the image's layers: it above `base`.
fn freeze(upper: &std::path::Path, dir: &std::path::Path, base: &[PathBuf]) -> anyhow::Result<()> {
    crate::sys::remove_tree(dir)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let scratch = dir.join("layer.partial");
    // `cp -a` keeps owners, modes, links, device nodes (overlay's whiteouts) and extended
    // attributes (its opaque directories); a reflink where the filesystem can.
    let status = std::process::Command::new("cp")
        .args(["-a", "--reflink=auto", "--no-target-directory"])
        .arg(upper)
        .arg(&scratch)
        .stdin(Stdio::null())
        .status()
        .context("running cp")?;
    if !status.success() {
        bail!("cp -a {} failed ({status})", upper.display());
    }
    let layer = dir.join("layer");
    std::fs::rename(&scratch, &layer).context("moving the layer into place")?;
    let mut layers = vec![layer];
    layers.extend(base.iter().cloned());
    let text: String = layers
        .iter()
        .map(|p| format!("{}\n", p.display()))
        .collect();
    std::fs::write(dir.join(LAYERS_FILE), text).context("recording the image's layers")?;
    Ok(())
}

fn read_layers(dir: &std::path::Path) -> anyhow::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(dir.join(LAYERS_FILE))
        .with_context(|| format!("reading {}", dir.join(LAYERS_FILE).display()))?;
    Ok(text.lines().map(PathBuf::from).collect())
}

/// The front's answers about images: `DescribeImages` says `pending` for an image whose layer
/// is not made yet (moto says `available` at once) and `failed`, with why, for one the lab
/// cannot make.
pub struct ImageEdge(pub Arc<LabImages>);

impl Edge for ImageEdge {
    fn rewrite(&self, call: &EmulatorCall, status: u16, body: &[u8]) -> Option<Vec<u8>> {
        if call.service != "ec2" || call.action != "DescribeImages" || status != 200 {
            return None;
        }
        let text = String::from_utf8_lossy(body);
        let rewritten = describe_images_states(&text, |ami| match self.0.state(ami) {
            Some(ImageState::Ready(_)) => None,
            Some(ImageState::Failed(why)) => Some(("failed", Some(why))),
            // Not seen yet (just made) or being made.
            Some(ImageState::Making) | None => Some(("pending", None)),
        });
        (rewritten != text).then(|| rewritten.into_bytes())
    }
}

/// `xml` (a DescribeImages answer) with each image's `imageState` replaced where `state`
/// says so, and a `stateReason` added when it gives one.
fn describe_images_states(
    xml: &str,
    state: impl Fn(&str) -> Option<(&'static str, Option<String>)>,
) -> String {
    let mut out = String::with_capacity(xml.len());
    let mut rest = xml;
    const ID: &str = "<imageId>";
    while let Some(at) = rest.find(ID) {
        let start = at + ID.len();
        let Some(length) = rest[start..].find("</imageId>") else {
            break;
        };
        let ami = &rest[start..start + length];
        let after_id = start + length;
        let next_id = rest[after_id..]
            .find(ID)
            .map_or(rest.len(), |i| after_id + i);
        let state_at = rest[after_id..next_id]
            .find("<imageState>")
            .map(|i| after_id + i);
        match (state(ami), state_at) {
            (Some((name, reason)), Some(state_at)) => {
                let value_at = state_at + "<imageState>".len();
                let Some(end) = rest[value_at..].find("</imageState>") else {
                    break;
                };
                let close = value_at + end + "</imageState>".len();
                out.push_str(&rest[..value_at]);
                out.push_str(name);
                out.push_str("</imageState>");
                if let Some(reason) = reason {
                    out.push_str("<stateReason><code>Client.InvalidState</code><message>");
                    out.push_str(&xml_escape(&reason));
                    out.push_str("</message></stateReason>");
                }
                rest = &rest[close..];
            }
            _ => {
                out.push_str(&rest[..after_id]);
                rest = &rest[after_id..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The front's answer to `GetConsoleOutput` for a lab machine: the end of its console (what
/// its `/dev/console` received, boots and shutdowns included), as EC2 keeps the last 64 KiB;
/// moto answers a fixed sample text.
pub struct ConsoleEdge(pub Lab);

/// How much of a console EC2 returns.
const CONSOLE_BYTES: u64 = 64 * 1024;

impl Edge for ConsoleEdge {
    fn rewrite(&self, call: &EmulatorCall, status: u16, _body: &[u8]) -> Option<Vec<u8>> {
        if call.service != "ec2" || call.action != "GetConsoleOutput" || status != 200 {
            return None;
        }
        let instance = call.param("InstanceId").filter(|id| is_instance_id(id))?;
        let path = self.0.machine_dir(instance).join("console.log");
        let output = console_tail(&path, CONSOLE_BYTES).unwrap_or_default();
        use base64::Engine as _;
        let encoded = base64::engine::general_purpose::STANDARD.encode(output);
        let timestamp = rigger_plan::deploys::utc_iso8601(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        );
        Some(
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<GetConsoleOutputResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>rigger-lab</requestId><instanceId>{instance}</instanceId><timestamp>{timestamp}</timestamp><output>{encoded}</output></GetConsoleOutputResponse>"
            )
            .into_bytes(),
        )
    }
}

/// The last `limit` bytes of the file at `path`.
fn console_tail(path: &std::path::Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let length = file.metadata()?.len();
    file.seek(SeekFrom::Start(length.saturating_sub(limit)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Reads every image of the emulator (for [`LabImages::converge`]).
pub async fn emulator_images(clients: &Clients) -> Option<Vec<LabImage>> {
    match rigger_aws::lab::images(clients).await {
        Ok(images) => Some(images),
        Err(error) => {
            tracing::warn!(%error, "DescribeImages");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &str = "<DescribeImagesResponse><imagesSet>\
<item><blockDeviceMapping><item><ebs><snapshotId>snap-1</snapshotId></ebs></item></blockDeviceMapping><name>base</name><imageId>ami-base</imageId><imageState>available</imageState></item>\
<item><name>made</name><sourceInstanceId>i-0123456789abcdef0</sourceInstanceId><imageId>ami-made</imageId><imageState>available</imageState><isPublic>false</isPublic></item>\
<item><name>bad</name><imageId>ami-bad</imageId><imageState>available</imageState></item>\
</imagesSet></DescribeImagesResponse>";

    #[test]
    fn images_not_made_yet_are_pending_and_those_that_cannot_be_are_failed() {
        let out = describe_images_states(ANSWER, |ami| match ami {
            "ami-made" => Some(("pending", None)),
            "ami-bad" => Some(("failed", Some("its instance <x> was running & more".into()))),
            _ => None,
        });
        assert!(out.contains("<imageId>ami-base</imageId><imageState>available</imageState>"));
        assert!(
            out.contains("<imageId>ami-made</imageId><imageState>pending</imageState><isPublic>")
        );
        assert!(out.contains(
            "<imageId>ami-bad</imageId><imageState>failed</imageState><stateReason><code>Client.InvalidState</code><message>its instance &lt;x&gt; was running &amp; more</message></stateReason></item>"
        ));
        assert_eq!(describe_images_states(ANSWER, |_| None), ANSWER);
    }

    #[test]
    fn the_edge_answers_pending_until_the_layer_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let lab = Lab::new(&dir.path().join("state"), &dir.path().join("images")).unwrap();
        let images = Arc::new(LabImages::new(
            &lab,
            &[("ami-base".to_owned(), PathBuf::from("/images/base/rootfs"))],
        ));
        let edge = ImageEdge(Arc::clone(&images));
        let call = EmulatorCall {
            service: "ec2".into(),
            action: "DescribeImages".into(),
            params: Vec::new(),
        };
        let answer =
            String::from_utf8(edge.rewrite(&call, 200, ANSWER.as_bytes()).unwrap()).unwrap();
        assert!(answer.contains("<imageId>ami-base</imageId><imageState>available"));
        assert!(answer.contains("<imageId>ami-made</imageId><imageState>pending"));
        images.set("ami-made", ImageState::Ready(vec![PathBuf::from("/x")]));
        images.set("ami-bad", ImageState::Ready(vec![PathBuf::from("/y")]));
        assert!(edge.rewrite(&call, 200, ANSWER.as_bytes()).is_none());
        let other = EmulatorCall {
            action: "DescribeInstances".into(),
            ..call
        };
        assert!(edge.rewrite(&other, 200, ANSWER.as_bytes()).is_none());
    }

    #[tokio::test]
    async fn a_stopped_instances_disk_becomes_a_layer_above_its_images() {
        let dir = tempfile::tempdir().unwrap();
        let lab = Lab::new(&dir.path().join("state"), &dir.path().join("images")).unwrap();
        let base = dir.path().join("base");
        std::fs::create_dir_all(&base).unwrap();
        let images = LabImages::new(&lab, &[("ami-base".to_owned(), base.clone())]);
        let instance = "i-0123456789abcdef0";
        let upper = lab.machine_dir(instance).join("upper");
        std::fs::create_dir_all(upper.join("etc")).unwrap();
        std::fs::write(upper.join("etc/installed"), "nginx\n").unwrap();
        let made = LabImage {
            id: "ami-made".into(),
            state: "available".into(),
            source_instance: Some(instance.into()),
        };
        let foreign = LabImage {
            id: "ami-foreign".into(),
            state: "available".into(),
            source_instance: None,
        };
        let running = LabImage {
            id: "ami-running".into(),
            state: "available".into(),
            source_instance: Some("i-0000000000000000a".into()),
        };
        // Still stopping: not yet.
        let source = |stopping: bool| {
            move |id: &str| match id {
                "i-0123456789abcdef0" => Some(Source {
                    instance_state: if stopping { "stopping" } else { "stopped" },
                    machine_running: stopping,
                    image_id: Some("ami-base"),
                }),
                "i-0000000000000000a" => Some(Source {
                    instance_state: "running",
                    machine_running: true,
                    image_id: Some("ami-base"),
                }),
                _ => None,
            }
        };
        images
            .converge(
                &[made.clone(), foreign.clone(), running.clone()],
                source(true),
            )
            .await;
        assert_eq!(images.state("ami-made"), Some(ImageState::Making));
        assert!(
            matches!(images.state("ami-foreign"), Some(ImageState::Failed(why)) if why.contains("only its own images"))
        );
        assert!(
            matches!(images.state("ami-running"), Some(ImageState::Failed(why)) if why.contains("stopped instances only"))
        );
        images
            .converge(std::slice::from_ref(&made), source(false))
            .await;
        let started = std::time::Instant::now();
        loop {
            images
                .converge(std::slice::from_ref(&made), source(false))
                .await;
            if let Some(ImageState::Ready(layers)) = images.state("ami-made") {
                let layer = lab.created_images_dir().join("ami-made/layer");
                assert_eq!(layers, vec![layer.clone(), base.clone()]);
                assert_eq!(
                    std::fs::read_to_string(layer.join("etc/installed")).unwrap(),
                    "nginx\n"
                );
                break;
            }
            assert!(
                started.elapsed().as_secs() < 30,
                "{:?}",
                images.state("ami-made")
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // Its instance's disk changing later does not change the image.
        std::fs::write(upper.join("etc/installed"), "changed\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(
                lab.created_images_dir()
                    .join("ami-made/layer/etc/installed")
            )
            .unwrap(),
            "nginx\n"
        );
    }

    #[test]
    fn the_console_is_its_last_64_kib() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut text = "x".repeat(70 * 1024);
        text.push_str("\nrigger-image-build: ok\n");
        std::fs::write(&path, &text).unwrap();
        let tail = console_tail(&path, CONSOLE_BYTES).unwrap();
        assert_eq!(tail.len() as u64, CONSOLE_BYTES);
        assert!(String::from_utf8_lossy(&tail).ends_with("rigger-image-build: ok\n"));
    }
}
