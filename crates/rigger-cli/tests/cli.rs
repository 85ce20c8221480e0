//! The real `rigger` binary, run in a temporary directory.

mod hermetic;
use std::path::Path;
use std::process::Output;

fn rigger(dir: &Path, args: &[&str]) -> Output {
    crate::hermetic::rigger_binary()
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("rigger runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rigger-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn init_writes_a_file_that_validates_and_plans() {
    let dir = temp_dir("init");
    let out = rigger(&dir, &["init", "--name", "mysite"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = rigger(&dir, &["validate"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("project `mysite`"));

    let out = rigger(&dir, &["plan", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["schema"], "rigger.plan");
    assert_eq!(plan["environment"], "local");
    assert!(plan["summary"]["create"].as_u64().unwrap() > 10);

    // A second init refuses to overwrite.
    let out = rigger(&dir, &["init"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("already exists; pass --force"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_invalid_config_exits_2_with_located_errors_and_runs_nothing() {
    let dir = temp_dir("invalid");
    std::fs::write(
        dir.join("rigger.toml"),
        rigger_config::starter("mysite").replace("desired = 2", "desird = 2"),
    )
    .unwrap();
    for command in [&["validate"][..], &["plan"], &["plan", "--json"]] {
        let out = rigger(&dir, command);
        assert_eq!(out.status.code(), Some(2), "{command:?}");
        assert!(
            out.stdout.is_empty(),
            "{command:?} printed data: {}",
            text(&out.stdout)
        );
        let stderr = text(&out.stderr);
        assert!(stderr.contains("unknown key `desird`"), "{stderr}");
        assert!(stderr.contains(" --> rigger.toml:"), "{stderr}");
        assert!(stderr.contains("help: did you mean `desired`?"), "{stderr}");
        assert!(
            !stderr.contains('\x1b'),
            "colour without a terminal: {stderr}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// rigger writes `desired.json` (`rigger scale`) and `registry.json` (the supervisor): a
/// damaged one stops `plan` with an error naming it and saying what to do, where it used to
/// be read as "nothing scaled" and "nothing deployed".
#[test]
fn plan_reports_a_damaged_state_file() {
    let dir = temp_dir("damaged-state");
    std::fs::write(dir.join("rigger.toml"), rigger_config::starter("mysite")).unwrap();
    let state = dir.join("state");
    let env_dir = state.join("mysite/local");
    std::fs::create_dir_all(&env_dir).unwrap();
    let plan = || {
        crate::hermetic::rigger_binary()
            .arg("plan")
            .current_dir(&dir)
            .env_remove("RUST_LOG")
            .env("RIGGER_STATE_DIR", &state)
            .output()
            .expect("rigger runs")
    };
    for (file, what_to_do) in [
        (
            "desired.json",
            "remove it to go back to rigger.toml's `desired` counts",
        ),
        ("registry.json", "move the file aside"),
    ] {
        let path = env_dir.join(file);
        std::fs::write(&path, "{\"web\": 3").unwrap();
        let out = plan();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {stderr}");
        assert!(out.stdout.is_empty(), "{file}: {}", text(&out.stdout));
        assert!(
            stderr.contains(&format!("{} is damaged (", path.display())),
            "{stderr}"
        );
        assert!(stderr.contains(what_to_do), "{stderr}");
        std::fs::remove_file(&path).unwrap();
    }
    let out = plan();
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unknown_environment_names_the_known_ones() {
    let dir = temp_dir("unknown-env");
    std::fs::write(dir.join("rigger.toml"), rigger_config::starter("mysite")).unwrap();
    let out = rigger(&dir, &["plan", "-e", "staging"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no environment `staging`"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("it defines: local"),
        "{}",
        text(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_missing_config_says_how_to_make_one() {
    let dir = temp_dir("missing");
    let out = rigger(&dir, &["plan"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("rigger init"),
        "{}",
        text(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_example_site_plans_both_environments() {
    let site = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/site");
    let out = rigger(&site, &["plan", "-e", "production"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("+ load_balancer surveys-production-lb"),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#"= "HTTPS:443/healthcheck.html""#),
        "{stdout}"
    );
    assert!(
        stdout.trim_end().ends_with("0 to delete, 0 unchanged."),
        "{stdout}"
    );
}
