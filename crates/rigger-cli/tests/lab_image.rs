//! `rigger image build -e ENV` against the lab (issue 12), from the stock lab image (Debian's
//! EC2 AMI as it is, none of the roles' packages): the builder boots from the environment's
//! AMI as a real machine, runs rigger's builder script, which installs every role's packages
//! from Debian's archive through the lab's package mirror (and the AWS CLI it installs trusts
//! the lab's CA), reports its outcome on its console (GetConsoleOutput: what the machine wrote
//! to `/dev/console`) and powers off; the lab's CreateImage freezes its disk as a layer, and an
//! instance launched from the new AMI boots that layer above the stock image, packages there.
//! A second build with nothing changed reuses the image. `rigger lab down` removes the image's
//! layer with the lab.
//!
//! Needs root, the lab image and moto (scripts/test provides them); fails, never skips.

mod hermetic;
use std::path::Path;
use std::process::Stdio;
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
    crate::hermetic::rigger_binary()
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
#[ignore = "end to end: scripts/test runs it after the other tests (-- --ignored)"]
fn an_image_built_in_the_lab_boots_its_own_layer() {
    let (lab, started) = start_lab();
    let dir = tempfile::tempdir().unwrap();
    project(dir.path(), &started.endpoint, &started.stock_ami);

    let building = Instant::now();
    let built = rigger(dir.path(), &started.endpoint, &["image", "build"]);
    assert!(built.status.success(), "{}", text(&built));
    let build_seconds = building.elapsed().as_secs_f64();
    let ami = String::from_utf8_lossy(&built.stdout).trim().to_owned();
    assert!(
        ami.starts_with("ami-") && ami != started.stock_ami && ami != started.ami,
        "{}",
        text(&built)
    );
    // The builder's work is in the image's layer: the roles' packages, installed from the
    // archive (the stock image has none), and Debian's epmd masked by its script.
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
    for installed in [
        "usr/lib/postgresql/15/bin/postgres",
        "usr/sbin/nginx",
        "usr/bin/aws",
    ] {
        assert!(
            layer.join(installed).exists(),
            "{installed} installed by the builder"
        );
    }

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
        // The AWS CLI the builder installed reaches the lab's API (its TLS trusts the lab's CA).
        let user_data = "#!/bin/bash\n\
             epmd=$(readlink /etc/systemd/system/epmd.socket)\n\
             postgresql=$(dpkg-query -W -f='${Status}' postgresql-15 2>&1)\n\
             AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \\\n\
               aws --region us-east-1 ec2 describe-regions --output text \\\n\
               >/tmp/aws.out 2>&1 && aws=ok || aws=$(head -c 400 /tmp/aws.out)\n\
             if [ \"$epmd\" = /dev/null ] && [ \"$postgresql\" = 'install ok installed' ] \\\n\
                && [ \"$aws\" = ok ]; then\n\
               echo 'booted the baked layer' >/dev/console\n\
             else\n\
               echo \"the baked layer is not complete: epmd.socket=$epmd postgresql-15=$postgresql aws=$aws\" >/dev/console\n\
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
                .filter(|text| text.contains("the baked layer"))
        },
    );
    let console_text = std::fs::read_to_string(&console).unwrap();
    assert!(
        console_text.contains("booted the baked layer"),
        "{console_text}"
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
