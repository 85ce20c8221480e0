//! Deploys on AWS from the command line, against moto's server: `deploy` twice from an app's
//! git history, `rollback`, `releases`, `lock status`, `maintenance on|off` (recorded in SSM
//! and shown by `status`). Moto's servers cannot be reached, so the steps on the servers
//! (migrations, warm shutdown, switching nginx) are skipped with a note; the library tests in
//! rigger-aws cover the rollout's decisions.

mod hermetic;
use std::path::Path;

#[path = "../../rigger-aws/tests/common/mod.rs"]
mod moto;

mod aws_cli;
use aws_cli::{committed_app, git, ok, rigger, text};

fn status_json(dir: &Path, url: &str) -> serde_json::Value {
    serde_json::from_slice(&ok(dir, url, &["status", "--json"]).stdout).unwrap()
}

/// The first `up` builds the first release from the app's git HEAD, and refuses, before
/// anything is made, an app it cannot build one from; uncommitted changes are left out, with
/// a warning.
#[test]
fn up_builds_the_first_release_from_git_head_or_refuses_before_making_anything() {
    let moto = moto::Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let url = moto.url.as_str();
    let config =
        moto::config_text("", 1, "t3.small").replace("app_path = \".\"", "app_path = \"app\"");
    std::fs::write(dir.path().join("rigger.toml"), config).unwrap();
    let app = dir.path().join("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("manage.py"), "print('v1')\n").unwrap();

    let refused = |needle: &str| {
        let out = rigger(dir.path(), url, &["up"]).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(text(&out).contains(needle), "{}", text(&out));
        let plan = ok(dir.path(), url, &["plan"]);
        assert!(
            !String::from_utf8_lossy(&plan.stdout).contains("No changes"),
            "something was made: {}",
            text(&plan)
        );
    };
    refused("is not in a git repository");
    git(&app, &["init", "-q"]);
    git(&app, &["add", "manage.py"]);
    git(&app, &["commit", "-qm", "no requirements"]);
    refused("has no requirements.txt");

    std::fs::write(app.join("requirements.txt"), "").unwrap();
    git(&app, &["add", "requirements.txt"]);
    git(&app, &["commit", "-qm", "v1"]);
    std::fs::write(app.join("manage.py"), "print('dirty')\n").unwrap();
    let up = ok(dir.path(), url, &["up"]);
    assert!(
        text(&up).contains("uncommitted changes, which the first release leaves out"),
        "{}",
        text(&up)
    );
    assert!(
        text(&up).contains("uploaded the first release ("),
        "{}",
        text(&up)
    );

    // `secrets list` names the secrets `up` stored in SSM, never their values.
    let listed = ok(dir.path(), url, &["secrets", "list", "--json"]);
    let names: Vec<String> = serde_json::from_slice(&listed.stdout).expect("a JSON list");
    for name in ["db_password", "django_secret_key", "ca_key", "ca_cert"] {
        assert!(names.iter().any(|n| n == name), "{name}: {names:?}");
    }
    assert!(!text(&listed).contains("BEGIN"), "{}", text(&listed));
}

#[test]
fn deploy_rollback_releases_lock_and_maintenance_from_the_command_line() {
    let moto = moto::Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let url = moto.url.as_str();
    let config =
        moto::config_text("", 1, "t3.small").replace("app_path = \".\"", "app_path = \"app\"");
    std::fs::write(dir.path().join("rigger.toml"), config).unwrap();
    let app = dir.path().join("app");
    committed_app(&app);

    // The first release is the app at HEAD, uploaded before the groups launch, once.
    let up = ok(dir.path(), url, &["up"]);
    assert!(
        text(&up).contains("built the first release from ")
            && text(&up).contains("uploaded the first release (")
            && text(&up).contains("/releases/initial.tar.gz"),
        "{}",
        text(&up)
    );
    let again = ok(dir.path(), url, &["up"]);
    assert!(!text(&again).contains("first release"), "{}", text(&again));
    // Before any deploy there is nothing to roll back to: a clear error, exit 1.
    let refused = rigger(dir.path(), url, &["rollback"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        text(&refused).contains("no release before"),
        "{}",
        text(&refused)
    );

    let fast = ["--health-timeout", "60", "--drain-timeout", "0"];
    let first = ok(dir.path(), url, &[&["deploy"][..], &fast].concat());
    assert!(
        text(&first).contains("migrations skipped"),
        "{}",
        text(&first)
    );
    let first_id = String::from_utf8_lossy(&first.stdout).trim().to_owned();
    std::fs::write(app.join("manage.py"), "print('v2')\n").unwrap();
    git(&app, &["commit", "-qam", "v2"]);
    // A dirty tree is refused (nothing uploaded, no lock left).
    std::fs::write(app.join("manage.py"), "print('dirty')\n").unwrap();
    let dirty = rigger(dir.path(), url, &[&["deploy"][..], &fast].concat())
        .output()
        .unwrap();
    assert!(!dirty.status.success());
    assert!(text(&dirty).contains("--allow-dirty"), "{}", text(&dirty));
    git(&app, &["checkout", "-q", "manage.py"]);
    let second = ok(dir.path(), url, &[&["deploy"][..], &fast].concat());
    let second_id = String::from_utf8_lossy(&second.stdout).trim().to_owned();
    assert_ne!(first_id, second_id);
    assert_eq!(status_json(dir.path(), url)["release"], second_id.as_str());

    let back = ok(dir.path(), url, &[&["rollback"][..], &fast].concat());
    assert_eq!(String::from_utf8_lossy(&back.stdout).trim(), first_id);
    assert_eq!(status_json(dir.path(), url)["release"], first_id.as_str());

    let releases: serde_json::Value =
        serde_json::from_slice(&ok(dir.path(), url, &["releases", "--json"]).stdout).unwrap();
    let results: Vec<(String, String)> = releases
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["release"].as_str().unwrap().to_owned(),
                r["result"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        results,
        [
            (first_id.clone(), "succeeded".to_owned()),
            (second_id, "succeeded".to_owned()),
            (first_id, "succeeded".to_owned()),
        ]
    );
    let lock = ok(dir.path(), url, &["lock", "status"]);
    assert_eq!(String::from_utf8_lossy(&lock.stdout).trim(), "free");

    let on = ok(dir.path(), url, &["maintenance", "on"]);
    assert!(
        text(&on).contains("web servers not switched"),
        "{}",
        text(&on)
    );
    assert_eq!(status_json(dir.path(), url)["maintenance"], true);
    let human = ok(dir.path(), url, &["status"]);
    assert!(
        String::from_utf8_lossy(&human.stdout).contains("maintenance mode is on"),
        "{}",
        text(&human)
    );
    ok(dir.path(), url, &["maintenance", "off"]);
    assert_eq!(status_json(dir.path(), url)["maintenance"], false);

    // Scaling sets the group's desired count within its bounds; outside them it is refused.
    ok(dir.path(), url, &["scale", "web=3"]);
    let web = status_json(dir.path(), url)["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "web")
        .cloned()
        .unwrap();
    assert_eq!(web["desired"], 3, "{web}");
    let refused = rigger(dir.path(), url, &["scale", "web=9"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(
        text(&refused).contains("outside the group's bounds 1..=4"),
        "{}",
        text(&refused)
    );

    ok(dir.path(), url, &["down", "--yes"]);
}

/// A release carries a wheel for every requirement, built on this machine, so servers install
/// it without PyPI: the example site's first release, fetched back from the bucket, holds a
/// wheel for each line of its requirements, and the servers' own install function
/// (`install_release`, with `aws s3 cp` answered from the emulator's bucket) installs it into
/// a fresh venv with `pip --no-index`, by the unprivileged build user. Root only: the build
/// user and `runuser` need it, as on servers.
#[test]
fn a_release_carries_its_wheels_and_installs_from_them_alone() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (the build user, runuser)");
        return;
    }
    let moto = moto::Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let url = moto.url.as_str();
    let config =
        moto::config_text("", 1, "t3.small").replace("app_path = \".\"", "app_path = \"app\"");
    std::fs::write(dir.path().join("rigger.toml"), config).unwrap();
    let app = dir.path().join("app");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/site/app");
    let copied = std::process::Command::new("cp")
        .arg("-R")
        .arg(&example)
        .arg(&app)
        .status()
        .unwrap();
    assert!(copied.success());
    git(&app, &["init", "-q"]);
    git(&app, &["add", "."]);
    git(&app, &["commit", "-qm", "the example site"]);

    let up = ok(dir.path(), url, &["up"]);
    let object = text(&up)
        .split_whitespace()
        .find_map(|word| word.strip_prefix("s3://").map(str::to_owned))
        .unwrap_or_else(|| panic!("no release uploaded: {}", text(&up)));
    let (bucket, key) = object.split_once('/').unwrap();

    // What the servers get: the tarball in the bucket.
    let server = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        server.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let bin = server.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    // `aws s3 cp --region R --only-show-errors s3://BUCKET/KEY DEST`, from the emulator
    // (which checks that a request is signed, not its signature).
    let authorization = "Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0";
    std::fs::write(
        bin.join("aws"),
        format!(
            "#!/bin/sh\n[ \"$1 $2\" = 's3 cp' ] || exit 2\nexec curl -fsS -H '{authorization}' -o \"$7\" \"{url}/${{6#s3://}}\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        bin.join("aws"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let release = server.path().join("app");
    let venv = server.path().join("venv");
    let install = std::process::Command::new("/bin/bash")
        .arg("-c")
        .arg(format!(
            "set -euo pipefail\n{}\ninstall_release \"$@\"",
            rigger_aws::userdata::INSTALL_RELEASE_FUNCTION
        ))
        .arg("install")
        .args([bucket, key, "us-east-1"])
        .arg(&release)
        .arg(&venv)
        .args(["requirements.txt", "rigger-build"])
        // The servers' python3 is Debian's; any index pip would try is a closed port.
        .env_clear()
        .env(
            "PATH",
            format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display()),
        )
        .env("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")
        .output()
        .unwrap();
    assert!(install.status.success(), "{}", text(&install));

    // A wheel for every requirement, whatever the spelling of its name.
    let normalize = |name: &str| name.to_ascii_lowercase().replace(['-', '.'], "_");
    let wheels: Vec<String> = std::fs::read_dir(release.join(rigger_aws::releases::WHEELS))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(wheels.iter().all(|w| w.ends_with(".whl")), "{wheels:?}");
    let requirements = std::fs::read_to_string(release.join("requirements.txt")).unwrap();
    let mut required = 0;
    for line in requirements.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name = normalize(line.split(['[', '=', '<', '>', ';', ' ']).next().unwrap());
        required += 1;
        assert!(
            wheels
                .iter()
                .any(|w| normalize(w.split('-').next().unwrap()) == name),
            "no wheel for {line}: {wheels:?}"
        );
    }
    assert!(required >= 5, "{requirements}");

    // Installed from them alone, by the build user, into a venv that is root's now.
    let imported = std::process::Command::new(venv.join("bin/python"))
        .args(["-c", "import django, celery, gunicorn, redis, psycopg"])
        .output()
        .unwrap();
    assert!(imported.status.success(), "{}", text(&imported));
    use std::os::unix::fs::MetadataExt as _;
    for made in [venv.join("bin/pip"), venv.join("pyvenv.cfg")] {
        assert_eq!(
            std::fs::symlink_metadata(&made).unwrap().uid(),
            0,
            "{}",
            made.display()
        );
    }
    ok(dir.path(), url, &["down", "--yes"]);
}
