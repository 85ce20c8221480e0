//! `rigger exec`, `logs`, `manage` and `ssh` on a local environment, run as the real binary.
//!
//! The environment is a stand-in for a running one: the state directory a supervisor leaves
//! (servers' directories with logs and pid files, `status.json`) and its lock, held by this
//! test process, so the commands see a live supervisor. The commands then run real processes
//! in each server's context (as root, or as www-data for `manage`): the full stack is the
//! lead's end-to-end test (`local_stack.rs`). Needs root (`manage` switches to www-data).

mod hermetic;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Output;

use rigger_local::status::Status;

const PROJECT: &str = "remotetest";

/// A fake running local environment in a temporary directory.
struct Running {
    dir: tempfile::TempDir,
    /// The supervisor's lock, as a running supervisor holds it.
    lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

impl Running {
    fn new() -> Running {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test switches to www-data: run it as root"
        );
        let dir = tempfile::tempdir().unwrap();
        // Service users must reach the state directory, as under /var/lib/rigger.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let project = dir.path().join("project");
        std::fs::create_dir_all(project.join("app")).unwrap();
        std::fs::write(project.join("app/manage.py"), "").unwrap();
        std::fs::write(project.join("requirements.txt"), "django\n").unwrap();
        std::fs::write(
            project.join("rigger.toml"),
            format!(
                "[project]\nname = \"{PROJECT}\"\napp_path = \"app\"\n\
                 wsgi_module = \"site.wsgi:application\"\ncelery_app = \"site\"\n\
                 domains = [\"example.com\"]\nrequirements = \"requirements.txt\"\n\n\
                 [environments.local]\nprovider = \"local\"\naddresses = \"127.93.0.0/16\"\n"
            ),
        )
        .unwrap();
        let root = dir.path().join("state").join(PROJECT).join("local");
        let servers = [
            ("web-1", "web", "127.93.1.1"),
            ("web-2", "web", "127.93.1.2"),
            ("worker-1", "worker", "127.93.2.1"),
        ];
        for (id, _, _) in servers {
            let server = root.join("servers").join(id);
            std::fs::create_dir_all(server.join("log")).unwrap();
            std::fs::create_dir_all(server.join("pids")).unwrap();
        }
        for id in ["web-1", "web-2"] {
            let log = root.join("servers").join(id).join("log");
            std::fs::write(
                log.join("nginx.log"),
                format!("{id} nginx 1\n{id} nginx 2\n"),
            )
            .unwrap();
            std::fs::write(log.join("gunicorn.log"), format!("{id} gunicorn 1\n")).unwrap();
            std::fs::write(log.join("steps.log"), "not a service\n").unwrap();
        }
        let venv = dir.path().join("venv");
        let worker = root.join("servers/worker-1");
        std::fs::create_dir_all(venv.join("bin")).unwrap();
        write_executable(
            &venv.join("bin/python"),
            "#!/bin/sh\necho \"python $* as $(id -un) in $PWD for $RIGGER_ROLE with HOME=$HOME\"\n[ \"$2\" = fail ] && exit 4\nexit 0\n",
        );
        std::fs::write(
            worker.join("pids/celery-worker.pid"),
            serde_json::json!({
                "pid": 1, "start_time": 1, "boot_id": "", "name": "worker-1/celery-worker",
                "program": venv.join("bin/celery").display().to_string(),
                "stop_signal": "SIGTERM"
            })
            .to_string(),
        )
        .unwrap();
        std::fs::create_dir_all(worker.join("etc/app")).unwrap();
        let env_file = worker.join("etc/app/app.env");
        std::fs::write(
            &env_file,
            "RIGGER_ROLE=worker\nDJANGO_SECRET_KEY=\"x y$z\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&env_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        nix::unistd::chown(&env_file, Some(nix::unistd::Uid::from_raw(33)), None).unwrap();
        std::fs::create_dir_all(root.join("releases/initial")).unwrap();

        let status = serde_json::json!({
            "schema": "rigger.status", "version": 1, "project": PROJECT,
            "environment": "local", "provider": "local", "phase": "ready", "message": "",
            "release": "initial", "urls": [], "supervisor_pid": std::process::id(),
            "groups": [], "replication": [], "updated": 0,
            "servers": servers.iter().map(|(id, role, address)| serde_json::json!({
                "id": id, "roles": [role], "address": address, "release": "initial",
                "state": "in_service", "processes": [], "load_balancer": null
            })).collect::<Vec<_>>(),
        });
        serde_json::from_value::<Status>(status.clone())
            .expect("the fake status.json follows rigger_local's Status");
        std::fs::write(root.join("status.json"), status.to_string()).unwrap();

        let lock_path = root.join("supervisor.lock");
        std::fs::write(
            &lock_path,
            serde_json::json!({"pid": std::process::id(), "user": "root", "host": "test", "started": 0})
                .to_string(),
        )
        .unwrap();
        let lock = nix::fcntl::Flock::lock(
            std::fs::File::open(&lock_path).unwrap(),
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        )
        .map_err(|(_, e)| e)
        .expect("locking supervisor.lock");
        Running {
            dir,
            lock: Some(lock),
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("state").join(PROJECT).join("local")
    }

    fn rigger(&self, args: &[&str]) -> Output {
        crate::hermetic::rigger_binary()
            .args(args)
            .current_dir(self.dir.path().join("project"))
            .env("RIGGER_STATE_DIR", self.dir.path().join("state"))
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .output()
            .expect("rigger runs")
    }
}

fn write_executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn sorted_lines(bytes: &[u8]) -> Vec<String> {
    let mut lines: Vec<String> = text(bytes).lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

/// Durations vary: `0.01 s` becomes `T s`.
fn without_durations(text: &str) -> String {
    text.lines()
        .map(|line| match line.rsplit_once("  ") {
            Some((head, tail)) if tail.ends_with(" s") => format!("{head}  T s"),
            _ => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn exec_runs_on_every_matching_server_in_its_context_and_summarises() {
    let env = Running::new();
    let out = env.rigger(&[
        "exec",
        "web",
        "worker-1",
        "--",
        "echo",
        "$RIGGER_SERVER",
        "in",
        "$PWD",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let root = env.root();
    let servers = root.join("servers");
    assert_eq!(
        sorted_lines(&out.stdout),
        [
            format!("web-1    | web-1 in {}/web-1", servers.display()),
            format!("web-2    | web-2 in {}/web-2", servers.display()),
            format!("worker-1 | worker-1 in {}/worker-1", servers.display()),
        ]
    );
    assert_eq!(
        without_durations(&text(&out.stderr)),
        "\
web-1     ok           exit 0  T s
web-2     ok           exit 0  T s
worker-1  ok           exit 0  T s
3 servers: 3 ok, 0 failed, 0 unreachable"
    );
}

#[test]
fn exec_fails_when_any_server_fails_and_says_which() {
    let env = Running::new();
    let out = env.rigger(&[
        "exec",
        "--parallel",
        "1",
        "--",
        r#"if [ "$RIGGER_SERVER" = web-2 ]; then echo oops >&2; exit 3; fi"#,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        without_durations(&text(&out.stderr)),
        "\
web-2    | oops
web-1     ok           exit 0  T s
web-2     failed       exit 3  T s
worker-1  ok           exit 0  T s
3 servers: 2 ok, 1 failed, 0 unreachable
error: `if [ \"$RIGGER_SERVER\" = web-2 ]; then echo oops >&2; exit 3; fi` did not succeed on 1 of 3 servers"
    );
}

#[test]
fn exec_names_the_roles_and_servers_when_a_target_is_unknown() {
    let env = Running::new();
    let out = env.rigger(&["exec", "db", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "error: no server or role `db`; roles: web, worker; servers: web-1, web-2, worker-1\n"
    );
}

#[test]
fn manage_runs_once_on_a_worker_as_the_app_with_its_environment() {
    let env = Running::new();
    let out = env.rigger(&["manage", "--", "showmigrations", "polls"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let worker = env.root().join("servers/worker-1");
    assert_eq!(
        text(&out.stdout),
        format!(
            "python manage.py showmigrations polls as www-data in {} for worker with HOME={}/home/www-data\n",
            env.root().join("releases/initial").display(),
            worker.display()
        )
    );
    assert_eq!(
        text(&out.stderr),
        "manage.py showmigrations polls on worker-1\n"
    );

    let out = env.rigger(&["manage", "--", "fail"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).ends_with("error: `manage.py fail` on worker-1 ended with exit 4\n"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn logs_merge_every_service_log_of_a_role_prefixed() {
    let env = Running::new();
    let out = env.rigger(&["logs", "web", "-n", "1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        sorted_lines(&out.stdout),
        [
            "web-1/gunicorn | web-1 gunicorn 1",
            "web-1/nginx    | web-1 nginx 2",
            "web-2/gunicorn | web-2 gunicorn 1",
            "web-2/nginx    | web-2 nginx 2",
        ]
    );

    let out = env.rigger(&["logs", "web-2", "--service", "nginx"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        sorted_lines(&out.stdout),
        ["web-2/nginx | web-2 nginx 1", "web-2/nginx | web-2 nginx 2"]
    );

    let out = env.rigger(&["logs", "web", "--service", "redis"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "error: no redis log on web; the logs there are: gunicorn, nginx\n"
    );
}

#[test]
fn ssh_opens_a_shell_in_the_server_directory() {
    let env = Running::new();
    let mut child = crate::hermetic::rigger_binary()
        .args(["ssh", "web-2"])
        .current_dir(env.dir.path().join("project"))
        .env("RIGGER_STATE_DIR", env.dir.path().join("state"))
        .env("SHELL", "/bin/sh")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo \"$RIGGER_SERVER $PWD\"\nexit 0\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout),
        format!("web-2 {}\n", env.root().join("servers/web-2").display())
    );
}

#[test]
fn commands_on_a_stopped_environment_say_how_to_start_it() {
    let mut env = Running::new();
    env.lock = None;
    let out = env.rigger(&["exec", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!("error: {PROJECT}/local is not running; `rigger up -e local` starts it\n")
    );
}

/// The moto server and AWS configuration of rigger-aws's tests.
#[path = "../../rigger-aws/tests/common/mod.rs"]
mod moto;

/// A server's SSH host key, as its user-data publishes it.
const HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIgKJC2VezGCTLU08GeruvaGyF60q4hSSIfqjAx6IhNr";

/// `rigger exec --list` against the AWS emulator: an environment brought up there, its servers
/// publishing their host keys as their user-data does (but worker-1, still booting), listed
/// with how each server would be reached, first at public addresses, then through a bastion;
/// then a terminated server's keys are deleted. Nothing connects: moto's addresses are fake
/// and must never be dialled.
#[test]
fn exec_list_shows_how_each_aws_server_is_reached_without_connecting() {
    let moto = moto::Moto::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let config = moto::config(&moto::config_text("", 2, "t3.small"));
    let provider = runtime.block_on(moto::provider(&moto, config));
    let servers = runtime.block_on(async {
        provider.up(moto::RELEASE, &moto::quiet).await.unwrap();
        for server in provider.servers().await.unwrap() {
            if server.id != "worker-1" {
                publish_host_key(&provider, &server.instance_id).await;
            }
        }
        provider.servers().await.unwrap()
    });
    let published = |id: &str| {
        servers
            .iter()
            .find(|s| s.id == id)
            .unwrap()
            .host_keys
            .clone()
    };
    assert_eq!(published("web-1").as_deref(), Some(HOST_KEY));
    assert_eq!(published("worker-1"), None);
    let address = |id: &str, public: bool| {
        let server = servers.iter().find(|s| s.id == id).unwrap();
        let address = if public {
            &server.public_address
        } else {
            &server.private_address
        };
        address.clone().unwrap_or_else(|| "none".into())
    };
    let dir = tempfile::tempdir().unwrap();
    // Keys pinned for a server that is gone are removed whenever the servers are listed.
    let pinned = dir.path().join("state/shop/prod/ssh/pinned");
    std::fs::create_dir_all(&pinned).unwrap();
    std::fs::write(pinned.join("i-0gone"), format!("i-0gone {HOST_KEY}\n")).unwrap();
    let list = |extra: &str| {
        std::fs::write(
            dir.path().join("rigger.toml"),
            moto::config_text(extra, 2, "t3.small"),
        )
        .unwrap();
        let out = crate::hermetic::rigger_binary()
            .args(["exec", "-e", "prod", "--list", "--endpoint-url", &moto.url])
            .current_dir(dir.path())
            .env("RIGGER_STATE_DIR", dir.path().join("state"))
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_MAX_ATTEMPTS", "1")
            .env_remove("AWS_PROFILE")
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .output()
            .expect("rigger runs");
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
            .lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
    };

    // Group servers get a public address; stand-alone servers sit on their own network
    // interface, which has none, so they need a bastion.
    let unpublished = format!(
        "worker-1 worker in_service unreachable (it has not published its SSH host keys (SSM \
         parameter /shop/prod/hostkeys/{}), so rigger cannot tell it from an impostor: a server \
         publishes them early in its first boot, so wait until `rigger status` shows it in \
         service; one launched before rigger pinned host keys never will: replace it (`rigger \
         deploy` replaces group servers))",
        servers
            .iter()
            .find(|s| s.id == "worker-1")
            .unwrap()
            .instance_id
    );
    let no_route = "unreachable (it has no public address, and there is no bastion; to reach \
                    servers at their private addresses, name a jump host in their VPC in \
                    `[environments.prod]`: `bastion = \"user@host\"`)";
    assert_eq!(
        list(""),
        [
            format!(
                "web-1 web in_service ssh admin@{}:22",
                address("web-1", true)
            ),
            format!(
                "web-2 web in_service ssh admin@{}:22",
                address("web-2", true)
            ),
            unpublished.clone(),
            format!("cache cache,queue in_service {no_route}"),
            format!("db-primary db-primary in_service {no_route}"),
            format!("db-replica1 db-replica in_service {no_route}"),
        ]
    );
    assert!(address("web-1", true).parse::<std::net::Ipv4Addr>().is_ok());
    assert!(
        !pinned.join("i-0gone").exists(),
        "a gone server's keys stayed pinned"
    );

    let via = "via ops@bastion.example.com:2200";
    let behind = |id: &str, roles: &str| {
        format!(
            "{id} {roles} in_service ssh debian@{}:2222 {via}",
            address(id, false)
        )
    };
    assert_eq!(
        list(
            "bastion = \"ops@bastion.example.com:2200\"\ndeploy_user = \"debian\"\nssh_port = 2222"
        ),
        [
            behind("web-1", "web"),
            behind("web-2", "web"),
            unpublished,
            behind("cache", "cache,queue"),
            behind("db-primary", "db-primary"),
            behind("db-replica1", "db-replica"),
        ]
    );

    // A server terminated (by scaling, by hand) takes its published keys with it at the next
    // sweep; the others keep theirs.
    let replica = servers.iter().find(|s| s.id == "db-replica1").unwrap();
    runtime.block_on(async {
        provider
            .clients
            .ec2
            .terminate_instances()
            .instance_ids(&replica.instance_id)
            .send()
            .await
            .unwrap();
        provider.status().await.unwrap();
        let left = rigger_aws::hostkeys::published(&provider.env, &provider.clients)
            .await
            .unwrap();
        assert!(!left.contains_key(&replica.instance_id), "{left:?}");
        let web = servers.iter().find(|s| s.id == "web-1").unwrap();
        assert!(left.contains_key(&web.instance_id), "{left:?}");
    });
}

/// Writes `instance`'s host key where its user-data would publish it.
async fn publish_host_key(provider: &rigger_aws::Provider, instance: &str) {
    let name = rigger_aws::hostkeys::parameter(&provider.env, instance);
    rigger_aws::parameters::put(&provider.clients, &name, HOST_KEY)
        .await
        .unwrap();
}

/// Before asking AWS anything: a missing `ssh_identity` file, then missing credentials, each
/// with what to do.
#[test]
fn aws_commands_say_what_is_missing_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &str| {
        std::fs::write(
            dir.path().join("rigger.toml"),
            moto::config_text(extra, 2, "t3.small"),
        )
        .unwrap();
        let mut command = crate::hermetic::rigger_binary();
        command
            .args(["exec", "-e", "prod", "--", "true"])
            .current_dir(dir.path())
            .env("HOME", dir.path())
            .env("RIGGER_STATE_DIR", dir.path().join("state"))
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1");
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("AWS_") {
                command.env_remove(name);
            }
        }
        let out = command.output().expect("rigger runs");
        assert!(!out.status.success());
        text(&out.stderr)
    };
    let missing_key = run("ssh_identity = \"keys/prod\"");
    assert!(
        missing_key.contains(&format!(
            "the SSH key {}/keys/prod (`ssh_identity` of environment `prod`",
            dir.path().display()
        )),
        "{missing_key}"
    );
    let on_ec2 = [
        "/sys/devices/virtual/dmi/id/sys_vendor",
        "/sys/hypervisor/uuid",
    ]
    .iter()
    .any(|p| std::fs::read_to_string(p).is_ok_and(|s| s.to_ascii_lowercase().contains("ec2")));
    if !on_ec2 {
        let no_credentials = run("");
        assert!(
            no_credentials.contains("no AWS credentials are configured"),
            "{no_credentials}"
        );
    }
}
