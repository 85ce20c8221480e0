//! `rigger image build -e ENV` against the lab (issue 12): the builder boots from the
//! environment's AMI as a real machine, runs rigger's builder script, reports its outcome on
//! its console (GetConsoleOutput: what the machine wrote to `/dev/console`) and powers off;
//! the lab's CreateImage freezes its disk as a layer, and an instance launched from the new
//! AMI boots that layer above the lab image. A second build with nothing changed reuses the
//! image. `rigger lab down` removes the image's layer with the lab.
//!
//! Needs root, the lab image and moto (scripts/test provides them); fails, never skips.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod lab_support;
use lab_support::*;

/// A project whose `lab` environment is an AWS one on the lab's AMI.
fn project(dir: &Path, endpoint: &str, ami: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let clients = connect(&runtime, endpoint);
    let certificate = upload_self_signed_certificate(
        &runtime,
        &clients,
        dir,
        "surveys-image",
        "surveys.example.com",
    );
    std::fs::write(
        dir.join("rigger.toml"),
        format!(
            r#"[project]
name = "surveys"
app_path = "."
wsgi_module = "surveys.wsgi:application"
celery_app = "surveys"
domains = ["surveys.example.com"]

[environments.lab]
provider = "aws"
region = "{REGION}"
ami = "{ami}"
certificate = "{certificate}"
admin_cidrs = ["172.31.0.0/16"]
"#
        ),
    )
    .unwrap();
}

fn rigger(dir: &Path, endpoint: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rigger"))
        .args(["-e", "lab", "--endpoint-url", endpoint])
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .env("RIGGER_STATE_DIR", dir.join("state"))
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_MAX_ATTEMPTS", "1")
        .env_remove("AWS_PROFILE")
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

#[test]
fn an_image_built_in_the_lab_boots_its_own_layer() {
    let (lab, started) = start_lab();
    let dir = tempfile::tempdir().unwrap();
    project(dir.path(), &started.endpoint, &started.ami);

    let building = Instant::now();
    let built = rigger(dir.path(), &started.endpoint, &["image", "build"]);
    assert!(built.status.success(), "{}", text(&built));
    let build_seconds = building.elapsed().as_secs_f64();
    let ami = String::from_utf8_lossy(&built.stdout).trim().to_owned();
    assert!(
        ami.starts_with("ami-") && ami != started.ami,
        "{}",
        text(&built)
    );
    // The builder's work is in the image's layer: Debian's epmd masked by its script.
    let layer = lab
        .state
        .path()
        .join("created-images")
        .join(&ami)
        .join("layer");
    assert_eq!(
        std::fs::read_link(layer.join("etc/systemd/system/epmd.socket")).unwrap(),
        Path::new("/dev/null"),
        "the builder's changes are in the image"
    );

    // Nothing changed: the image is reused.
    let again = rigger(dir.path(), &started.endpoint, &["image", "build"]);
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), ami);

    // An instance of the new image boots its layer above the lab image.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let clients = connect(&runtime, &started.endpoint);
    let instance = runtime.block_on(async {
        let subnet = default_subnet(&clients).await;
        use base64::Engine as _;
        let user_data = "#!/bin/bash\n\
             if [ \"$(readlink /etc/systemd/system/epmd.socket)\" = /dev/null ]; then\n\
               echo 'booted the baked layer' >/dev/console\n\
             fi\n";
        clients
            .ec2
            .run_instances()
            .image_id(&ami)
            .min_count(1)
            .max_count(1)
            .subnet_id(subnet)
            .user_data(base64::engine::general_purpose::STANDARD.encode(user_data))
            .send()
            .await
            .expect("RunInstances")
            .instances()[0]
            .instance_id()
            .unwrap()
            .to_owned()
    });
    let console = lab
        .state
        .path()
        .join("machines")
        .join(&instance)
        .join("console.log");
    wait_for(
        "the baked machine's boot on its console",
        Duration::from_secs(120),
        || {
            std::fs::read_to_string(&console)
                .ok()
                .filter(|text| text.contains("booted the baked layer"))
                .map(drop)
        },
    );

    let down = lab.rigger(&["down"]);
    assert!(down.status.success(), "{}", text(&down));
    assert!(
        !lab.state.path().join("created-images").exists(),
        "the image's layer goes with the lab"
    );
    assert_nothing_left(&lab, &started);
    eprintln!("measured: rigger image build in the lab {build_seconds:.1} s");
}
