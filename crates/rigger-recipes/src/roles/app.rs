//! The app servers: web (nginx, gunicorn) and worker (Celery worker and beat), and what both
//! share: the app's environment file, PgBouncer and the stunnel client to the databases.

use std::time::Duration;

use minijinja::context;
use minijinja::value::{Serde, Value};
use serde::Serialize;

use super::{Builder, s, service, sj};
use crate::context::PGBOUNCER_ADMIN_USER;
use crate::engine::percent_encode;
use crate::error::RenderError;
use crate::{
    Command, Layout, PEER_WAIT, Phase, Probe, Retry, Role, ServerContext, ServiceSpec, Signal,
    StepSpec,
};

/// The environment file that tells rigger's operations how to reach PgBouncer's admin console
/// on a web or worker server (`PGBOUNCER_HOST`, `_PORT`, `_ADMIN_USER`, `_ADMIN_PASSWORD`),
/// readable by root only.
pub fn pgbouncer_admin_env(layout: &crate::Layout) -> std::path::PathBuf {
    layout.etc("pgbouncer").join("admin.env")
}

/// The app's environment file on a web or worker server (`etc/app/app.env`).
pub fn app_env_file(layout: &crate::Layout) -> std::path::PathBuf {
    layout.etc("app").join("app.env")
}

/// The app's variables, on top of its environment file, that make `manage.py` talk straight
/// to the primary over TLS checked against the environment CA, instead of through this
/// server's PgBouncer: migrations want a session of their own (PgBouncer pools transactions),
/// and need no replica. Both providers run migrations so.
pub fn primary_direct_env(ctx: &ServerContext) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_HOST", ctx.peers.db_primary.address.to_string()),
        ("DATABASE_PORT", ctx.ports.postgres.to_string()),
        ("DATABASE_REPLICA_NAMES", String::new()),
        ("PGSSLMODE", "verify-full".to_owned()),
        ("PGSSLROOTCERT", s(&ctx.layout.ca_cert())),
    ]
}

/// The PostgreSQL advisory lock (a `bigint`, the bytes of `riggermi`) the migrations of
/// [`boot_migrations`] run under.
pub const MIGRATION_LOCK: i64 = 0x7269_6767_6572_6d69;

/// The step that runs the release's migrations on a server at boot, before its app starts:
/// `manage.py shell` takes [`MIGRATION_LOCK`] on its database connection (straight to the
/// primary, [`primary_direct_env`]) and runs `migrate` on that same connection, so servers
/// booting together migrate one at a time: the first does the work, the others find nothing
/// to do. The lock goes with the process, whatever ends it. The primary may still be booting,
/// so the step is retried ([`Retry`], [`PEER_WAIT`]). The app's settings reach it as they
/// reach its services: the environment file, loaded as the app's user.
pub fn boot_migrations(ctx: &ServerContext) -> StepSpec {
    let l = &ctx.layout;
    let code = format!(
        "from django.core.management import call_command; from django.db import connection; \
         connection.cursor().execute('SELECT pg_advisory_lock(%s)', [{MIGRATION_LOCK}]); \
         call_command('migrate', interactive=False)"
    );
    let command = as_app_user(
        l,
        Command::new("/usr/bin/env")
            .args(
                primary_direct_env(ctx)
                    .into_iter()
                    .map(|(key, value)| format!("{key}={value}")),
            )
            .args([sj(&l.venv_dir, "bin/python"), "manage.py".into()])
            .args(["shell", "-c", &code]),
    );
    StepSpec {
        name: "migrate".into(),
        command,
        phase: Phase::BeforeStart,
        creates: None,
        stdin_file: None,
        retry: Some(Retry {
            within: PEER_WAIT,
            clean: None,
        }),
    }
}

/// `command` run in the app's directory as the app's user, with its settings loaded from the
/// environment file by that user (as its services get them).
fn as_app_user(l: &Layout, command: Command) -> Command {
    let www = &l.users.www;
    command
        .cwd(&l.app_dir)
        .user(www)
        .env("HOME", s(&l.home(www)))
        .env("PYTHONUNBUFFERED", "1")
        .with_env_file(app_env_file(l))
}

/// The step that gathers the release's static files into `STATIC_ROOT` (the layout's
/// `static_root`, which the app's environment file names) on a web server, before its app
/// starts: `manage.py collectstatic --noinput` as the app's user, its settings loaded from the
/// environment file by that user, as its services get them. On AWS every web server runs it
/// after unpacking its release (the local supervisor runs collectstatic once per release into
/// the environment's shared static directory).
pub fn collect_static(ctx: &ServerContext) -> StepSpec {
    let l = &ctx.layout;
    let command = as_app_user(
        l,
        Command::new(sj(&l.venv_dir, "bin/python")).args([
            "manage.py",
            "collectstatic",
            "--noinput",
            "-v0",
        ]),
    );
    StepSpec {
        name: "collectstatic".into(),
        command,
        phase: Phase::BeforeStart,
        creates: None,
        stdin_file: None,
        retry: None,
    }
}

pub(super) fn web(b: &mut Builder) -> Result<(), RenderError> {
    common(b)?;
    let ctx = b.ctx;
    let l = b.layout();
    let u = &l.users;
    let (etc, run, log) = (l.etc("nginx"), l.run("nginx"), l.log("nginx"));
    let (g_run, g_log) = (l.run("gunicorn"), l.log("gunicorn"));
    b.dir(etc.clone(), 0o755, "root");
    b.dir(run.clone(), 0o755, "root");
    // Logs may quote requests and settings: readable by their writer only.
    b.dir(log.clone(), 0o700, "root");
    b.dir(l.maintenance_dir.clone(), 0o755, "root");
    b.dir(g_run.clone(), 0o755, &u.www);
    b.dir(g_log.clone(), 0o700, &u.www);

    let p = &ctx.project;
    let ports = &ctx.ports;
    let https_port_suffix = match ports.lb_https {
        443 => String::new(),
        port => format!(":{port}"),
    };
    let error_log = sj(&log, "error.log");
    let conf = b.template(
        "nginx.conf",
        context! {
            www_user => &u.www,
            worker_processes => ctx.tuning.nginx_worker_processes
                .map_or_else(|| "auto".to_owned(), |n| n.to_string()),
            run_dir => s(&run),
            error_log => &error_log,
            access_log => sj(&log, "access.log"),
            tls_cert => s(&l.tls_cert()),
            tls_key => s(&l.tls_key()),
            proxy_read_timeout => ctx.tuning.gunicorn_timeout + 5,
            gunicorn => format!("{}:{}", ctx.address, ports.gunicorn),
            maintenance_dir => s(&l.maintenance_dir),
            health_path => &p.health_check_path,
            canonical_domain => p.canonical_domain(),
            server_names => p.server_names(),
            http_port => ports.nginx_http,
            https_port => ports.nginx_https,
            https_port_suffix,
            hsts => p.hsts.map(|h| h.header_value()),
            load_balancer_networks => ctx.peers.load_balancer_networks
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
        },
    )?;
    let conf_path = etc.join("nginx.conf");
    b.file(conf_path.clone(), conf, 0o644, "root");

    let graceful = 30;
    let gunicorn = Command::new(sj(&l.venv_dir, "bin/gunicorn"))
        .arg(&p.wsgi_module)
        .args(["--bind", &format!("{}:{}", ctx.address, ports.gunicorn)])
        .args(["--workers", &ctx.tuning.gunicorn_workers.to_string()])
        .args(["--timeout", &ctx.tuning.gunicorn_timeout.to_string()])
        .args(["--graceful-timeout", &graceful.to_string()])
        // nginx connects from the loopback address locally, from this address on AWS.
        .args([
            "--forwarded-allow-ips",
            &format!("127.0.0.1,{}", ctx.address),
        ])
        .args(["--control-socket", &sj(&g_run, "gunicorn.ctl")])
        .args(["--access-logfile", &sj(&g_log, "access.log")])
        .args(["--error-logfile", "-"])
        .cwd(&l.app_dir);
    let gunicorn = app_env(b, gunicorn);
    b.service(ServiceSpec {
        env_file: Some(env_file_path(b)),
        depends_on: vec!["pgbouncer".into()],
        stop_timeout: Duration::from_secs(graceful + 5),
        reload_signal: Some(Signal::Hup),
        ..service(
            l,
            "gunicorn",
            &u.www,
            gunicorn,
            Probe::Tcp {
                addr: ctx.address,
                port: ports.gunicorn,
            },
        )
    });

    let nginx = Command::new(s(&l.bins.nginx))
        .args(["-p", &format!("{}/", s(&etc))])
        .args(["-c", &s(&conf_path)])
        .args(["-e", &error_log]);
    b.service(ServiceSpec {
        depends_on: vec!["gunicorn".into()],
        stop_signal: Signal::Quit,
        reload_signal: Some(Signal::Hup),
        ..service(
            l,
            "nginx",
            "root",
            nginx,
            Probe::Tls {
                addr: ctx.address,
                port: ports.nginx_https,
                server_name: ctx.server_id.clone(),
                ca_file: l.ca_cert(),
            },
        )
    });
    Ok(())
}

pub(super) fn worker(b: &mut Builder) -> Result<(), RenderError> {
    common(b)?;
    let ctx = b.ctx;
    let l = b.layout();
    let www = &l.users.www;
    let p = &ctx.project;
    let celery = || Command::new(sj(&l.venv_dir, "bin/celery")).args(["-A", &p.celery_app]);
    let node = format!("{}@{}", ctx.server_id, ctx.address);

    let worker = celery()
        .arg("worker")
        .args(["-n", &node])
        .args(["--without-mingle", "--without-gossip"])
        .args(["-c", &ctx.tuning.celery_concurrency.to_string()])
        .args(["--loglevel", "INFO"])
        .cwd(&l.app_dir);
    let ping = celery()
        .args(["inspect", "ping", "--destination", &node, "--timeout", "1"])
        .cwd(&l.app_dir)
        .user(www);
    let worker = app_env(b, worker);
    let ping = app_env(b, ping);
    b.service(ServiceSpec {
        env_file: Some(env_file_path(b)),
        depends_on: vec!["pgbouncer".into()],
        // SIGTERM is Celery's warm shutdown: running tasks finish first.
        stop_timeout: Duration::from_secs(600),
        ..service(l, "celery-worker", www, worker, Probe::Command(ping))
    });

    if ctx.celery_beat {
        let (data, run) = (l.data("celery"), l.run("celery"));
        b.dir(data.clone(), 0o755, www);
        b.dir(run.clone(), 0o755, www);
        let beat = celery()
            .arg("beat")
            .args(["--schedule", &sj(&data, "beat-schedule")])
            .args(["--pidfile", &sj(&run, "beat.pid")])
            .args(["--loglevel", "INFO"])
            .cwd(&l.app_dir);
        let beat = app_env(b, beat);
        b.service(ServiceSpec {
            env_file: Some(env_file_path(b)),
            // Started after the worker and stopped before it: no task is scheduled while no
            // worker consumes, and a worker's warm shutdown runs with beat already stopped.
            depends_on: vec!["celery-worker".into()],
            ..service(l, "celery-beat", www, beat, Probe::Running)
        });
    }
    Ok(())
}

/// What web and worker servers share: the app's environment file, the www user's home,
/// PgBouncer and stunnel. Rendered identically for both roles, so a server with both merges.
fn common(b: &mut Builder) -> Result<(), RenderError> {
    let ctx = b.ctx;
    let l = b.layout();
    let u = &l.users;
    let p = &ctx.project;
    let ports = &ctx.ports;

    b.dir(l.etc("app"), 0o755, "root");
    b.dir(l.home(&u.www), 0o755, &u.www);
    let vars = app_env_vars(b);
    let env = b.template("app.env", context! { vars })?;
    // Root's, readable by the app: root reads it (systemd, rigger's supervisor), so the app
    // must not be able to rewrite it.
    b.secret_file_readable_by(env_file_path(b), env, &u.www);

    // Databases: the primary, then replica N at stunnel_base + N.
    #[derive(Serialize)]
    struct Tunnel<'a> {
        id: &'a str,
        address: String,
        port: u16,
        name: String,
    }
    let peers = &ctx.peers;
    let tunnels: Vec<Tunnel> = std::iter::once(&peers.db_primary)
        .chain(&peers.db_replicas)
        .enumerate()
        .map(|(n, peer)| Tunnel {
            id: &peer.id,
            address: peer.address.to_string(),
            port: ports.stunnel_base + n as u16,
            name: match n {
                0 => p.db_name.clone(),
                n => format!("{}_replica{n}", p.db_name),
            },
        })
        .collect();

    let stunnel_etc = l.etc("stunnel");
    b.dir(stunnel_etc.clone(), 0o755, "root");
    let conf = b.template(
        "stunnel.conf",
        context! {
            tunnels => Value::from(Serde(&tunnels)),
            postgres_port => ports.postgres,
            ca_file => s(&l.ca_cert()),
        },
    )?;
    let conf_path = stunnel_etc.join("stunnel.conf");
    b.file(conf_path.clone(), conf, 0o644, "root");
    b.service(ServiceSpec {
        reload_signal: Some(Signal::Hup),
        ..service(
            l,
            "stunnel",
            &u.stunnel,
            Command::new(s(&l.bins.stunnel)).arg(s(&conf_path)),
            Probe::Tcp {
                addr: ctx.address,
                port: ports.stunnel_base,
            },
        )
    });

    let pgb_etc = l.etc("pgbouncer");
    b.dir(pgb_etc.clone(), 0o755, "root");
    // The app's user, and rigger's for the admin console (the app cannot pause its pooler).
    let users = [
        context! { name => &p.db_user, password => ctx.secrets.db_password.expose() },
        context! {
            name => PGBOUNCER_ADMIN_USER,
            password => ctx.secrets.pgbouncer_admin_password.expose(),
        },
    ];
    let userlist = b.template("userlist.txt", context! { users })?;
    let userlist_path = pgb_etc.join("userlist.txt");
    b.secret_file(userlist_path.clone(), userlist, &u.pgbouncer);
    // How rigger's operations reach the admin console, readable by root only.
    let admin_vars = [
        ("PGBOUNCER_HOST", ctx.address.to_string()),
        ("PGBOUNCER_PORT", ports.pgbouncer.to_string()),
        ("PGBOUNCER_ADMIN_USER", PGBOUNCER_ADMIN_USER.to_owned()),
        (
            "PGBOUNCER_ADMIN_PASSWORD",
            ctx.secrets.pgbouncer_admin_password.expose().to_owned(),
        ),
    ];
    let admin_env = b.template("pgbouncer-admin.env", context! { vars => admin_vars })?;
    b.secret_file(pgbouncer_admin_env(l), admin_env, "root");
    let databases: Vec<_> = tunnels
        .iter()
        .map(|t| context! { name => &t.name, host => ctx.address.to_string(), port => t.port })
        .collect();
    let ini = b.template(
        "pgbouncer.ini",
        context! {
            databases,
            db_name => &p.db_name,
            port => ports.pgbouncer,
            auth_file => s(&userlist_path),
            admin_user => PGBOUNCER_ADMIN_USER,
        },
    )?;
    let ini_path = pgb_etc.join("pgbouncer.ini");
    b.file(ini_path.clone(), ini, 0o644, &u.pgbouncer);
    b.service(ServiceSpec {
        depends_on: vec!["stunnel".into()],
        // SIGINT is PgBouncer's safe shutdown: it waits for running transactions.
        stop_signal: Signal::Int,
        reload_signal: Some(Signal::Hup),
        ..service(
            l,
            "pgbouncer",
            &u.pgbouncer,
            Command::new(s(&l.bins.pgbouncer)).arg(s(&ini_path)),
            Probe::Tcp {
                addr: ctx.address,
                port: ports.pgbouncer,
            },
        )
    });
    Ok(())
}

fn env_file_path(b: &Builder) -> std::path::PathBuf {
    app_env_file(b.layout())
}

/// The non-secret environment every app process gets on top of its env file.
fn app_env(b: &Builder, command: Command) -> Command {
    command
        .env("HOME", s(&b.layout().home(&b.layout().users.www)))
        .env("PYTHONUNBUFFERED", "1")
}

/// The variables of docs/app-contract.md, in the contract's order.
fn app_env_vars(b: &Builder) -> Vec<(&'static str, String)> {
    let ctx = b.ctx;
    let l = b.layout();
    let p = &ctx.project;
    let ports = &ctx.ports;
    let secrets = &ctx.secrets;
    let app_roles: Vec<&str> = ctx
        .roles
        .iter()
        .filter(|r| matches!(r, Role::Web | Role::Worker))
        .map(|r| r.as_str())
        .collect();
    let replica_names: Vec<String> = (1..=ctx.peers.db_replicas.len())
        .map(|n| format!("{}_replica{n}", p.db_name))
        .collect();
    vec![
        ("RIGGER_PROJECT", p.name.clone()),
        ("RIGGER_ENVIRONMENT", p.environment.clone()),
        ("RIGGER_ROLE", app_roles.join(",")),
        ("RIGGER_SERVER", ctx.server_id.clone()),
        ("RIGGER_RELEASE", p.release.clone()),
        (
            "DJANGO_SECRET_KEY",
            secrets.django_secret_key.expose().to_owned(),
        ),
        ("DJANGO_ALLOWED_HOSTS", p.server_names().join(",")),
        ("DATABASE_HOST", ctx.address.to_string()),
        ("DATABASE_PORT", ports.pgbouncer.to_string()),
        ("DATABASE_USER", p.db_user.clone()),
        ("DATABASE_PASSWORD", secrets.db_password.expose().to_owned()),
        ("DATABASE_NAME", p.db_name.clone()),
        ("DATABASE_REPLICA_NAMES", replica_names.join(",")),
        // Both over TLS, checked against RIGGER_CA_CERT (the servers' certificates name
        // their addresses).
        (
            "REDIS_URL",
            format!(
                "rediss://:{}@{}:{}",
                percent_encode(secrets.redis_password.expose()),
                ctx.peers.redis,
                ports.redis_tls
            ),
        ),
        (
            "CELERY_BROKER_URL",
            format!(
                "amqps://{}:{}@{}:{}/{}",
                percent_encode(&p.amqp_user),
                percent_encode(secrets.rabbitmq_password.expose()),
                ctx.peers.amqp,
                ports.amqps,
                percent_encode(&p.amqp_vhost)
            ),
        ),
        ("RIGGER_CA_CERT", s(&l.ca_cert())),
        ("MEDIA_ROOT", s(&l.media_root)),
        ("STATIC_ROOT", s(&l.static_root)),
    ]
}
