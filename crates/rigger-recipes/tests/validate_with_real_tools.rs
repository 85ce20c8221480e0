//! Rendered recipes against the real programs: openssl runs the PKI steps, `nginx -t` and
//! `haproxy -c` check their configs, and the database path (PostgreSQL primary and replica,
//! stunnel, PgBouncer), Redis and RabbitMQ are started from their recipes and used.
//!
//! Everything lives in a scratch directory, on addresses in 127.93.0.0/16 (the snapshot
//! tests' sample uses 127.77, the local provider's default). A test whose programs are
//! missing says so on stderr and passes; CI installs them. Tests that start services as
//! other users need root, as the local provider does.

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rigger_recipes::{
    Layout, Phase, Probe, Recipe, Role, ServerContext, Signal, envfile, pki, render_server,
};

const BLOCK: u8 = 93;

/// Tests that start services share addresses: one at a time.
static SERVICES: Mutex<()> = Mutex::new(());

/// systemd itself reads every unit of every server without a complaint (a key in the wrong
/// section is only a warning, ignored at run time: `StartLimitIntervalSec=` in `[Service]`
/// would silently leave the start limit on). Programs of the servers that this machine lacks
/// (the app's venv) are the only complaint allowed.
#[test]
fn systemd_reads_every_unit_without_a_warning() {
    if missing(&["/usr/bin/systemd-analyze"]) {
        return;
    }
    for (id, _, _) in common::SERVERS {
        let recipe = render_server(&common::systemd(id)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut units = Vec::new();
        for file in recipe
            .files
            .iter()
            .filter(|f| f.path.extension() == Some("service".as_ref()))
        {
            let path = dir.path().join(file.path.file_name().unwrap());
            std::fs::write(&path, &file.contents).unwrap();
            units.push(path);
        }
        let out = std::process::Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .args(&units)
            .output()
            .unwrap();
        let complaints: Vec<String> = String::from_utf8_lossy(&out.stderr)
            .lines()
            .chain(String::from_utf8_lossy(&out.stdout).lines())
            .filter(|line| !line.trim().is_empty())
            .filter(|line| !line.contains("is not executable: No such file or directory"))
            .map(str::to_owned)
            .collect();
        assert!(complaints.is_empty(), "{id}: {complaints:#?}");
    }
}

/// The migrations' code that `manage.py shell -c` runs is Python (checked by Python's parser).
#[test]
fn boot_migrations_code_is_python() {
    if missing(&["/usr/bin/python3"]) {
        return;
    }
    let step = rigger_recipes::boot_migrations(&common::systemd("web-1"));
    // `... manage.py shell -c CODE`.
    let args = &step.command.args;
    let shell = args.iter().position(|a| a == "shell").unwrap();
    assert_eq!(args[shell + 1], "-c");
    let python = &args[shell + 2];
    let out = std::process::Command::new("python3")
        .args(["-c", "import ast, sys; ast.parse(sys.argv[1])", python])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{python}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn pki_steps_make_a_verifiable_chain() {
    if missing(&["/usr/bin/openssl"]) {
        return;
    }
    let scratch = Scratch::new("pki");
    let layout = scratch.layout("web-1");
    make_certs(&scratch, &["web-1"]);
    let out = run_checked(
        std::process::Command::new("/usr/bin/openssl")
            .args(["verify", "-CAfile"])
            .arg(layout.ca_cert())
            .args(["-verify_hostname", "web-1", "-verify_ip"])
            .arg(common::addr_in(BLOCK, "web-1").to_string())
            .arg(layout.tls_cert()),
    );
    assert!(out.contains(": OK"), "{out}");
    let key_mode = std::fs::metadata(layout.tls_key())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let ca_key_mode = std::fs::metadata(pki::ca_key(&layout))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(ca_key_mode & 0o777, 0o600);

    // Applying again changes nothing: every step is guarded by what it creates.
    let before = std::fs::read(layout.tls_cert()).unwrap();
    make_certs(&scratch, &["web-1"]);
    assert_eq!(std::fs::read(layout.tls_cert()).unwrap(), before);
}

#[test]
fn a_self_signed_server_certificate_verifies_against_itself_without_a_ca() {
    if missing(&["/usr/bin/openssl"]) {
        return;
    }
    let scratch = Scratch::new("self-signed");
    let layout = scratch.layout("web-1");
    let recipe = pki::self_signed_cert(&layout, "web-1", common::addr_in(BLOCK, "web-1")).unwrap();
    apply_fs(&recipe);
    run_steps(&recipe, Phase::BeforeStart);
    assert!(!pki::ca_key(&layout).exists() && !layout.ca_cert().exists());
    let out = run_checked(
        std::process::Command::new("/usr/bin/openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(layout.tls_cert())
            .args(["-verify_hostname", "web-1", "-verify_ip"])
            .arg(common::addr_in(BLOCK, "web-1").to_string())
            .arg(layout.tls_cert()),
    );
    assert!(out.contains(": OK"), "{out}");
}

#[test]
fn nginx_accepts_the_web_config() {
    if missing(&["/usr/sbin/nginx", "/usr/bin/openssl"]) {
        return;
    }
    let scratch = Scratch::new("nginx");
    make_certs(&scratch, &["web-1"]);
    let ctx = scratch.context("web-1");
    let recipe = render_server(&ctx).unwrap();
    apply_fs(&recipe);
    let nginx = recipe.service("nginx").unwrap();
    let out = run_checked(process(&nginx.command, None).arg("-t"));
    assert!(out.contains("test is successful"), "{out}");
}

/// nginx hands the app the client's address: from X-Forwarded-For only on connections from
/// the load balancer (its rightmost address, the one the load balancer added), the
/// connection's own address from anyone else; other forwarding headers a client sent never
/// reach the app.
#[test]
fn nginx_takes_the_client_address_only_from_the_load_balancer() {
    if missing(&["/usr/sbin/nginx", "/usr/bin/openssl", "/usr/bin/curl"]) || !is_root() {
        return;
    }
    let _one = SERVICES.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("nginx-xff");
    make_certs(&scratch, &["web-1"]);
    let ctx = scratch.context("web-1");
    let mut running = Running::default();
    let app = start_nginx_before_a_stand_in_app(&ctx, &mut running);

    let ask_from = |source: std::net::Ipv4Addr| {
        run_checked(std::process::Command::new("/usr/bin/curl").args([
            "-sS",
            "--interface",
            &source.to_string(),
            "-H",
            "X-Forwarded-For: 198.51.100.66, 203.0.113.7",
            "-H",
            "X-Forwarded-Host: evil.example",
            "-H",
            "X-Forwarded-Proto: http",
            &format!("http://{}{}", ctx.address, ctx.project.health_check_path),
        ]));
        app.received
            .recv_timeout(Duration::from_secs(30))
            .expect("the request reached the app")
    };
    let lb = common::addr_in(BLOCK, "lb-1");
    let from_lb = ask_from(lb);
    assert!(
        from_lb.contains("x-forwarded-for: 203.0.113.7\r\n"),
        "from the load balancer: {from_lb}"
    );
    let stranger = common::addr_in(BLOCK, "worker-1");
    let from_stranger = ask_from(stranger);
    assert!(
        from_stranger.contains(&format!("x-forwarded-for: {stranger}\r\n")),
        "from another address: {from_stranger}"
    );
    for head in [&from_lb, &from_stranger] {
        assert!(!head.contains("x-forwarded-host"), "{head}");
        assert!(head.contains("x-forwarded-proto: https\r\n"), "{head}");
        assert!(!head.contains("198.51.100.66"), "{head}");
    }
}

/// With HSTS on, every HTTPS response of the site carries it (the app's, the health check's,
/// the maintenance page's 503), and no plain-HTTP response does.
#[test]
fn nginx_sends_hsts_on_https_responses_only() {
    if missing(&["/usr/sbin/nginx", "/usr/bin/openssl", "/usr/bin/curl"]) || !is_root() {
        return;
    }
    let _one = SERVICES.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("nginx-hsts");
    make_certs(&scratch, &["web-1"]);
    let mut ctx = scratch.context("web-1");
    ctx.project.hsts = Some(common::hsts());
    let mut running = Running::default();
    let _app = start_nginx_before_a_stand_in_app(&ctx, &mut running);

    let domain = ctx.project.canonical_domain().to_owned();
    let headers = |scheme: &str, port: u16, path: &str| {
        let out = run_checked(std::process::Command::new("/usr/bin/curl").args([
            "-sS",
            "-o",
            "/dev/null",
            "-D",
            "-",
            "--cacert",
            &ctx.layout.ca_cert().to_string_lossy(),
            // The server's certificate names its address; the Host header picks the site.
            "-H",
            &format!("Host: {domain}"),
            &format!("{scheme}://{}:{port}{path}", ctx.address),
        ]));
        out.to_ascii_lowercase()
    };
    let hsts = "strict-transport-security: max-age=31536000; includesubdomains\r\n";
    let https = ctx.ports.nginx_https;
    let app = headers("https", https, "/polls/");
    assert!(app.starts_with("http/1.1 200"), "{app}");
    assert!(app.contains(hsts), "{app}");
    let health = headers("https", https, &ctx.project.health_check_path);
    assert!(health.contains(hsts), "{health}");

    let maintenance = ctx.layout.maintenance_dir.join("maintenance.html");
    std::fs::write(&maintenance, "down for maintenance").unwrap();
    let page = headers("https", https, "/polls/");
    std::fs::remove_file(&maintenance).unwrap();
    assert!(page.starts_with("http/1.1 503"), "{page}");
    assert!(page.contains(hsts), "{page}");
    assert!(page.contains("retry-after: 60\r\n"), "{page}");

    let plain = headers("http", ctx.ports.nginx_http, "/polls/");
    assert!(plain.starts_with("http/1.1 301"), "{plain}");
    assert!(!plain.contains("strict-transport-security"), "{plain}");
}

/// Applies the web server's recipe, starts a stand-in for gunicorn on its port (answers `ok`
/// to every request and sends each request's head, lower-cased, to [`StandInApp::received`]),
/// then nginx.
fn start_nginx_before_a_stand_in_app(ctx: &ServerContext, running: &mut Running) -> StandInApp {
    let recipe = render_server(ctx).unwrap();
    apply_fs(&recipe);
    let address = SocketAddr::from((ctx.address, ctx.ports.gunicorn));
    let upstream = std::net::TcpListener::bind(address).unwrap();
    let (sender, received) = std::sync::mpsc::channel::<String>();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::spawn(move || {
        use std::io::{BufRead as _, Write as _};
        for stream in upstream.incoming() {
            if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let Ok(mut stream) = stream else { return };
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line.to_ascii_lowercase());
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
            let _ = sender.send(head);
        }
    });
    let nginx = recipe.service("nginx").unwrap();
    let child = process(&nginx.command, None)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    running.0.push(("nginx".into(), nginx.stop_signal, child));
    wait_ready(
        "nginx",
        &Probe::Tcp {
            addr: ctx.address,
            port: ctx.ports.nginx_http,
        },
        &nginx.log_file,
    );
    StandInApp {
        received,
        address,
        stop,
    }
}

/// The stand-in app's requests; dropping it closes its port (its thread stops at the next
/// connection, which the drop makes).
struct StandInApp {
    received: std::sync::mpsc::Receiver<String>,
    address: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for StandInApp {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.address, Duration::from_secs(5));
    }
}

#[test]
fn haproxy_accepts_the_lb_config_with_and_without_backends() {
    if missing(&["/usr/sbin/haproxy", "/usr/bin/openssl"]) {
        return;
    }
    let scratch = Scratch::new("haproxy");
    make_certs(&scratch, &["lb-1"]);
    let mut ctx = scratch.context("lb-1");
    for backends in [ctx.peers.web_backends.clone(), Vec::new()] {
        ctx.peers.web_backends = backends;
        let recipe = render_server(&ctx).unwrap();
        apply_fs(&recipe);
        let cfg = &recipe.files[0].path;
        run_checked(
            std::process::Command::new("/usr/sbin/haproxy")
                .arg("-c")
                .arg("-f")
                .arg(cfg),
        );
    }
}

#[test]
fn database_path_works_end_to_end() {
    let pg = Path::new("/usr/lib/postgresql/15/bin");
    if missing(&[
        &pg.join("postgres").to_string_lossy(),
        "/usr/sbin/pgbouncer",
        "/usr/bin/stunnel4",
        "/usr/bin/openssl",
    ]) || !is_root()
    {
        return;
    }
    let _one_at_a_time = SERVICES.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("db");
    make_certs(&scratch, &["db-1", "db-2"]);
    let mut running = Running::default();

    let primary = scratch.context("db-1");
    let recipe = render_server(&primary).unwrap();
    bring_up(&recipe, &mut running);
    let replica = scratch.context("db-2");
    bring_up(&render_server(&replica).unwrap(), &mut running);
    let web = scratch.context("web-1");
    let mut web_recipe = render_server(&web).unwrap();
    web_recipe
        .services
        .retain(|s| s.name == "stunnel" || s.name == "pgbouncer");
    bring_up(&web_recipe, &mut running);

    // The app's path: PgBouncer -> stunnel (TLS, certificate checked) -> PostgreSQL.
    let env_file = web_recipe
        .file(web.layout.etc("app").join("app.env"))
        .unwrap();
    let env = envfile::parse(&env_file.contents).unwrap();
    let psql = |db: &str, sql: &str| {
        let mut c = std::process::Command::new(pg.join("psql"));
        c.args(["-X", "-A", "-t", "-h", &env["DATABASE_HOST"], "-p"])
            .arg(&env["DATABASE_PORT"])
            .args(["-U", &env["DATABASE_USER"], "-d", db, "-c", sql])
            .env("PGPASSWORD", &env["DATABASE_PASSWORD"]);
        c
    };
    let out = run_checked(&mut psql(
        &env["DATABASE_NAME"],
        "CREATE TABLE t (x int); INSERT INTO t VALUES (42); SELECT pg_is_in_recovery()",
    ));
    assert!(out.contains('f'), "{out}");
    // PostgreSQL reads a quoted hostile value back as written, whatever
    // standard_conforming_strings says: it cannot end its literal.
    for hostile in [
        "x'; SELECT 'pwned",
        r"x\'; SELECT 1; --",
        r"x\",
        "''",
        "a\nb",
    ] {
        for strings in ["on", "off"] {
            let sql = format!(
                "SET standard_conforming_strings = {strings}; SELECT {}",
                rigger_recipes::quote_literal(hostile)
            );
            let out = run_checked(&mut psql(&env["DATABASE_NAME"], &sql));
            let value = out.strip_prefix("SET\n").and_then(|v| v.strip_suffix('\n'));
            assert_eq!(value, Some(hostile), "{sql}");
        }
    }
    let replica_db = env["DATABASE_REPLICA_NAMES"].clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = psql(&replica_db, "SELECT pg_is_in_recovery(), (SELECT x FROM t)")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if text.trim() == "t|42" {
            break;
        }
        assert!(Instant::now() < deadline, "replica never caught up: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The replica streams through its slot, under its own name.
    let out = run_checked(&mut process(
        &rigger_recipes::Command::new(pg.join("psql").to_string_lossy())
            .args(["-X", "-A", "-t", "-h"])
            .arg(primary.layout.run("postgresql").to_string_lossy())
            .args(["-U", "postgres", "-d", "postgres", "-c"])
            .arg("SELECT application_name, ssl FROM pg_stat_replication JOIN pg_stat_ssl USING (pid)")
            .user("postgres"),
        None,
    ));
    assert_eq!(out.trim(), "db-2|t");

    // TCP without TLS is refused, even with the right password.
    let plain = std::process::Command::new(pg.join("psql"))
        .arg(format!(
            "host={} port=5432 dbname=surveys_local user=surveys sslmode=disable",
            primary.address
        ))
        .args(["-X", "-c", "SELECT 1"])
        .env("PGPASSWORD", primary.secrets.db_password.expose())
        .output()
        .unwrap();
    assert!(!plain.status.success());
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("no pg_hba.conf entry"),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );

    // Applying the primary again converges (setup SQL and TLS steps are idempotent).
    run_steps(&recipe, Phase::BeforeStart);
    run_steps(&recipe, Phase::AfterStart);
}

/// Redis answers only over TLS, with a certificate that verifies against the environment's CA
/// for the server's address, and only to its password.
#[test]
fn redis_speaks_only_tls_and_requires_its_password() {
    if missing(&[
        "/usr/bin/redis-server",
        "/usr/bin/redis-cli",
        "/usr/bin/openssl",
    ]) || !is_root()
    {
        return;
    }
    let _one_at_a_time = SERVICES.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("redis");
    make_certs(&scratch, &["cache-1"]);
    let mut ctx = scratch.context("cache-1");
    ctx.roles = vec![Role::Cache];
    let mut running = Running::default();
    bring_up(&render_server(&ctx).unwrap(), &mut running);
    let port = ctx.ports.redis_tls.to_string();
    let cli = |tls: bool, password: Option<&str>| {
        let mut c = std::process::Command::new("/usr/bin/redis-cli");
        c.args(["-h", &ctx.address.to_string(), "-p", &port]);
        if tls {
            c.arg("--tls").arg("--cacert").arg(ctx.layout.ca_cert());
        }
        c.arg("ping");
        if let Some(p) = password {
            c.env("REDISCLI_AUTH", p);
        }
        let out = c.output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let password = ctx.secrets.redis_password.expose();
    assert!(cli(true, None).contains("NOAUTH"));
    assert_eq!(cli(true, Some(password)).trim(), "PONG");
    // In clear, the TLS port answers nothing, and Redis's usual port is closed.
    assert!(!cli(false, Some(password)).contains("PONG"));
    assert!(TcpStream::connect((ctx.address, 6379)).is_err());
    assert_answers_over_verified_tls(&ctx, ctx.ports.redis_tls, b"PING\r\n", b"-NOAUTH");
}

#[test]
fn rabbitmq_starts_with_the_project_user_and_no_guest_and_speaks_only_amqps() {
    if missing(&[
        "/usr/lib/rabbitmq/bin/rabbitmq-server",
        "/usr/bin/epmd",
        "/usr/bin/openssl",
    ]) || !is_root()
    {
        return;
    }
    let _one_at_a_time = SERVICES.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("rabbitmq");
    make_certs(&scratch, &["cache-1"]);
    let mut ctx = scratch.context("cache-1");
    ctx.roles = vec![Role::Queue];
    // RabbitMQ checks that its distribution port is free on every address, and epmd may
    // already hold 127.0.0.1:4369: ports of this test's own, away from other nodes here.
    ctx.ports.epmd = 4393;
    ctx.ports.rabbit_dist = 25693;
    let recipe = render_server(&ctx).unwrap();
    let mut running = Running::default();
    bring_up(&recipe, &mut running);

    let Probe::Command(ready) = &recipe.service("rabbitmq").unwrap().readiness else {
        panic!("rabbitmq's probe is a command");
    };
    let ctl = |args: &[&str]| {
        let mut c = ready.clone();
        c.args.truncate(2); // `-n NODE`
        process(&c.args(args.iter().copied()), None)
            .output()
            .unwrap()
    };
    let users = ctl(&["list_users", "-s"]);
    let users = String::from_utf8_lossy(&users.stdout);
    assert!(users.contains("surveys"), "{users}");
    assert!(!users.contains("guest"), "{users}");
    let auth = ctl(&[
        "authenticate_user",
        "surveys",
        ctx.secrets.rabbitmq_password.expose(),
    ]);
    assert!(
        auth.status.success(),
        "{}",
        String::from_utf8_lossy(&auth.stderr)
    );
    let vhosts = ctl(&["list_vhosts", "-s"]);
    assert!(String::from_utf8_lossy(&vhosts.stdout).contains("surveys_local"));

    // AMQP only over TLS: the AMQPS port answers the protocol header with the broker's
    // Connection.Start, behind a certificate of the CA; plain AMQP's port is closed.
    assert_answers_over_verified_tls(&ctx, ctx.ports.amqps, b"AMQP\x00\x00\x09\x01", b"RabbitMQ");
    assert!(TcpStream::connect((ctx.address, 5672)).is_err());
}

/// Connects to `port` of the server with TLS, checking its certificate against the
/// environment's CA and the server's address (what the app's clients check), sends `request`
/// and waits for `answer` among what the server says.
fn assert_answers_over_verified_tls(ctx: &ServerContext, port: u16, request: &[u8], answer: &[u8]) {
    use std::io::{Read as _, Write as _};
    let mut client = std::process::Command::new("/usr/bin/openssl")
        .args(["s_client", "-quiet", "-verify_return_error"])
        .arg("-connect")
        .arg(format!("{}:{port}", ctx.address))
        .arg("-CAfile")
        .arg(ctx.layout.ca_cert())
        .args(["-verify_ip", &ctx.address.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    client.stdin.as_mut().unwrap().write_all(request).unwrap();
    let mut stdout = client.stdout.take().unwrap();
    let (sender, said) = std::sync::mpsc::channel();
    let expected = answer.to_vec();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buffer = [0u8; 4096];
        // Until the answer arrives or the connection ends (a failed verification ends it).
        while !seen
            .windows(expected.len())
            .any(|w| w == expected.as_slice())
        {
            match stdout.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buffer[..n]),
            }
        }
        let _ = sender.send(seen);
    });
    let seen = said.recv_timeout(Duration::from_secs(30));
    let _ = client.kill();
    let out = client.wait_with_output().unwrap();
    let seen = seen.expect("the server answered within 30 s");
    assert!(
        seen.windows(answer.len()).any(|w| w == answer),
        "TLS to {port} did not answer {:?}: {:?}; openssl: {}",
        String::from_utf8_lossy(answer),
        String::from_utf8_lossy(&seen),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- a minimal applier: just enough of a provider to run recipes in tests ----

struct Scratch {
    root: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        let root =
            std::env::temp_dir().join(format!("rigger-recipes-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        Scratch { root }
    }

    fn layout(&self, id: &str) -> Layout {
        common::local_layout(&self.root, id)
    }

    fn context(&self, id: &str) -> ServerContext {
        common::context_in(BLOCK, id, self.layout(id))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Runs the CA recipe and a server certificate recipe for each of `ids`.
fn make_certs(scratch: &Scratch, ids: &[&str]) {
    let layout = scratch.layout(ids[0]);
    let ca = pki::ca(&layout, "surveys-local-ca").unwrap();
    apply_fs(&ca);
    run_steps(&ca, Phase::BeforeStart);
    for id in ids {
        let recipe = pki::server_cert(&scratch.layout(id), id, common::addr_in(BLOCK, id)).unwrap();
        apply_fs(&recipe);
        run_steps(&recipe, Phase::BeforeStart);
    }
}

/// Directories, files, BeforeStart steps, services in order (each waited for), AfterStart.
fn bring_up(recipe: &Recipe, running: &mut Running) {
    apply_fs(recipe);
    run_steps(recipe, Phase::BeforeStart);
    for service in &recipe.services {
        let log = std::fs::File::create(&service.log_file).unwrap();
        let env = match &service.env_file {
            Some(path) => envfile::parse(&std::fs::read_to_string(path).unwrap()).unwrap(),
            None => BTreeMap::new(),
        };
        let mut command = service.command.clone();
        command.user = Some(service.user.clone());
        let child = process(&command, Some(&env))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        running
            .0
            .push((service.name.clone(), service.stop_signal, child));
        wait_ready(&service.name, &service.readiness, &service.log_file);
    }
    run_steps(recipe, Phase::AfterStart);
}

fn apply_fs(recipe: &Recipe) {
    for dir in &recipe.dirs {
        std::fs::create_dir_all(&dir.path).unwrap();
        std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(dir.mode)).unwrap();
        chown(&dir.path, &dir.owner);
    }
    for file in &recipe.files {
        std::fs::create_dir_all(file.path.parent().unwrap()).unwrap();
        std::fs::write(&file.path, &file.contents).unwrap();
        std::fs::set_permissions(&file.path, std::fs::Permissions::from_mode(file.mode)).unwrap();
        chown(&file.path, &file.owner);
    }
}

fn run_steps(recipe: &Recipe, phase: Phase) {
    for step in recipe.steps.iter().filter(|s| s.phase == phase) {
        if step.creates.as_ref().is_some_and(|p| p.exists()) {
            continue;
        }
        run_checked(&mut process(&step.command, None));
    }
}

fn wait_ready(name: &str, probe: &Probe, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = match probe {
            Probe::Tcp { addr, port }
            | Probe::Tls { addr, port, .. }
            | Probe::Https { addr, port, .. } => TcpStream::connect_timeout(
                &SocketAddr::from((*addr, *port)),
                Duration::from_millis(200),
            )
            .is_ok(),
            Probe::Command(c) => process(c, None)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap()
                .success(),
            Probe::Running => true,
        };
        if ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not ready; its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Started services, stopped in reverse order with their stop signal when dropped.
#[derive(Default)]
struct Running(Vec<(String, Signal, Child)>);

impl Drop for Running {
    fn drop(&mut self) {
        while let Some((_, signal, mut child)) = self.0.pop() {
            let _ = std::process::Command::new("/usr/bin/kill")
                .args(["-s", signal.name(), &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A recipe's command as a process: as its user through `setpriv` (which execs, so signals
/// reach the program), with its environment and working directory.
fn process(
    c: &rigger_recipes::Command,
    extra_env: Option<&BTreeMap<String, String>>,
) -> std::process::Command {
    let mut p = match c.user.as_deref() {
        Some(user) if user != "root" && is_root() => {
            let mut p = std::process::Command::new("/usr/bin/setpriv");
            p.args([
                &format!("--reuid={user}"),
                &format!("--regid={user}"),
                "--init-groups",
                &c.program,
            ]);
            p
        }
        _ => std::process::Command::new(&c.program),
    };
    p.args(&c.args);
    if let Some(env) = extra_env {
        p.envs(env);
    }
    p.envs(&c.env);
    if let Some(cwd) = &c.cwd {
        p.current_dir(cwd);
    }
    p
}

fn run_checked(command: &mut std::process::Command) -> String {
    let out = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{command:?} failed:\n{text}");
    text
}

fn missing(programs: &[&str]) -> bool {
    let absent: Vec<_> = programs.iter().filter(|p| !Path::new(p).exists()).collect();
    if !absent.is_empty() {
        eprintln!("skipped: {absent:?} not installed");
    }
    !absent.is_empty()
}

fn is_root() -> bool {
    let root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    if !root {
        eprintln!("skipped: needs root to run services as their users");
    }
    root
}

/// Gives `path` to `owner` (a user, or `user:group`) and, without a group, the user's
/// primary group (when running as root).
fn chown(path: &Path, owner: &str) {
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
    {
        return;
    }
    let entry = |file: &str, name: &str| -> Vec<String> {
        std::fs::read_to_string(file)
            .unwrap()
            .lines()
            .map(|l| l.split(':').map(str::to_owned).collect::<Vec<_>>())
            .find(|f| f[0] == name)
            .unwrap_or_else(|| panic!("no {name} in {file}"))
    };
    let (user, group) = owner
        .split_once(':')
        .map_or((owner, None), |(u, g)| (u, Some(g)));
    let passwd = entry("/etc/passwd", user);
    let uid = passwd[2].parse().unwrap();
    let gid = match group {
        Some(group) => entry("/etc/group", group)[2].parse().unwrap(),
        None => passwd[3].parse().unwrap(),
    };
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
}
