//! Rendered recipes of the sample environment: snapshots of every file and of each recipe's
//! listing, and the rules every recipe must follow.

mod common;

use std::path::Path;

use rigger_recipes::{
    Phase, Probe, Recipe, RenderError, Role, Secret, ServerContext, ServiceManager, envfile,
    render, render_server,
};

use common::{SERVERS, local, systemd};

/// Snapshots a server's recipe listing and each of its files.
fn check_server(label: &str, ctx: &ServerContext) {
    let recipe = render_server(ctx).unwrap();
    let root = common_root(ctx);
    insta::assert_snapshot!(
        format!("{label}__{}__recipe", ctx.server_id),
        recipe.to_string().replace(&root, "{root}")
    );
    for file in &recipe.files {
        let rel = file
            .path
            .to_string_lossy()
            .replace(&root, "")
            .replace('/', "_");
        insta::assert_snapshot!(
            format!(
                "{label}__{}__{}",
                ctx.server_id,
                rel.trim_start_matches('_')
            ),
            file.contents.replace(&root, "{root}")
        );
    }
}

/// The local layout's common root, shown as `{root}` in snapshots (systemd paths stay).
fn common_root(ctx: &ServerContext) -> String {
    match ctx.layout.service_manager {
        ServiceManager::Rigger => "/state/surveys-local".into(),
        ServiceManager::Systemd => "\u{0}".into(),
    }
}

#[test]
fn local_snapshots() {
    for (id, _, _) in SERVERS {
        check_server("local", &local(id));
    }
}

#[test]
fn systemd_snapshots() {
    for id in ["web-1", "worker-1", "cache-1", "db-1", "db-2"] {
        check_server("systemd", &systemd(id));
    }
}

fn all_contexts() -> Vec<ServerContext> {
    SERVERS
        .iter()
        .flat_map(|(id, _, _)| [local(id), systemd(id)])
        .collect()
}

fn secret_values(ctx: &ServerContext) -> Vec<&str> {
    let s = &ctx.secrets;
    [
        &s.db_password,
        &s.replication_password,
        &s.redis_password,
        &s.rabbitmq_password,
        &s.django_secret_key,
    ]
    .into_iter()
    .map(Secret::expose)
    .collect()
}

/// The forms a secret takes in files: as is, and percent-encoded in URLs.
fn secret_forms(ctx: &ServerContext) -> Vec<String> {
    secret_values(ctx)
        .into_iter()
        .flat_map(|v| {
            let encoded: String = v
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            [v.to_owned(), encoded]
        })
        .collect()
}

#[test]
fn secrets_appear_only_in_secret_files_of_mode_0600() {
    for ctx in all_contexts() {
        let recipe = render_server(&ctx).unwrap();
        for file in &recipe.files {
            let leaked: Vec<_> = secret_forms(&ctx)
                .into_iter()
                .filter(|s| file.contents.contains(s.as_str()))
                .collect();
            if !leaked.is_empty() {
                assert!(
                    file.contains_secret,
                    "{}: {} holds a secret but is not flagged",
                    ctx.server_id,
                    file.path.display()
                );
            }
            if file.contains_secret {
                // Private to its owner, or root's and readable by one group only.
                let root_and_group = file.owner.starts_with("root:") && file.mode == 0o640;
                assert!(
                    file.mode == 0o600 || root_and_group,
                    "{}: {:04o} {}",
                    file.path.display(),
                    file.mode,
                    file.owner
                );
            }
        }
    }
}

/// Root writes every file of a recipe (and runs the steps without a user), so no such write
/// lands in a directory a service user owns: there, the user could swap the name for a link
/// between two of root's calls and have root write or chown something else.
#[test]
fn root_writes_only_into_directories_root_owns() {
    for ctx in all_contexts() {
        let recipe = render_server(&ctx).unwrap();
        // The recipe's own directories; the layout's other directories are root's.
        let owner_of = |path: &Path| {
            recipe
                .dirs
                .iter()
                .find(|d| d.path == path)
                .map_or("root", |d| d.owner.as_str())
        };
        let mut written: Vec<&Path> = recipe.files.iter().map(|f| f.path.as_path()).collect();
        // Steps run as root that copy a file: the destination is their last argument.
        for step in &recipe.steps {
            if step.command.user.is_none() && step.command.program.ends_with("/install") {
                written.push(Path::new(step.command.args.last().unwrap()));
            }
        }
        for path in written {
            let dir = path.parent().unwrap();
            assert_eq!(
                owner_of(dir),
                "root",
                "{}: root writes {} into {}, which a service user owns",
                ctx.server_id,
                path.display(),
                dir.display()
            );
        }
    }
}

#[test]
fn no_command_carries_a_secret() {
    for ctx in all_contexts() {
        let recipe = render_server(&ctx).unwrap();
        for command in recipe.commands() {
            let mut words: Vec<String> = command.argv().map(str::to_owned).collect();
            words.extend(command.env.iter().map(|(k, v)| format!("{k}={v}")));
            words.extend(command.cwd.iter().map(|c| c.display().to_string()));
            words.push(command.to_string());
            for secret in secret_forms(&ctx) {
                for word in &words {
                    assert!(
                        !word.contains(&secret),
                        "{}: command `{command}` carries a secret",
                        ctx.server_id
                    );
                }
            }
        }
    }
}

/// `Role::secrets` is what each role may read (on AWS, exactly what its instance profile
/// allows): it must name every secret the role's recipe writes, and nothing else.
#[test]
fn each_role_declares_exactly_the_secrets_its_recipe_uses() {
    let marker = |name: &str| format!("MARKER{}X", name.to_ascii_uppercase().replace('_', ""));
    for (id, _, roles) in SERVERS {
        for &role in *roles {
            let mut ctx = systemd(id);
            ctx.roles = vec![role];
            ctx.secrets = rigger_recipes::Secrets::try_from_names(|name| {
                Ok::<_, std::convert::Infallible>(Secret::new(marker(name)))
            })
            .unwrap();
            let recipe = rigger_recipes::render(role, &ctx).unwrap();
            let used: Vec<&str> = rigger_recipes::Secrets::NAMES
                .into_iter()
                .filter(|name| {
                    recipe
                        .files
                        .iter()
                        .any(|f| f.contents.contains(&marker(name)))
                })
                .collect();
            let mut declared = role.secrets().to_vec();
            declared.sort_unstable();
            let mut used = used;
            used.sort_unstable();
            assert_eq!(used, declared, "{}", role.as_str());
        }
    }
}

#[test]
fn pg_hba_allows_tcp_only_over_tls() {
    for id in ["db-1", "db-2"] {
        for ctx in [local(id), systemd(id)] {
            let recipe = render_server(&ctx).unwrap();
            let hba = recipe
                .file(ctx.layout.etc("postgresql").join("pg_hba.conf"))
                .unwrap();
            let rules: Vec<&str> = hba
                .contents
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
                .collect();
            assert!(!rules.is_empty());
            for rule in &rules {
                let kind = rule.split_whitespace().next().unwrap();
                assert!(
                    kind == "hostssl" || kind == "local",
                    "{id}: rule without TLS: {rule}"
                );
                assert!(!rule.contains("trust"), "{id}: {rule}");
            }
            let local: Vec<_> = rules.iter().filter(|r| r.starts_with("local")).collect();
            assert_eq!(local.len(), 1);
            assert!(
                local[0]
                    .split_whitespace()
                    .eq(["local", "all", "postgres", "peer"])
            );
        }
    }
}

#[test]
fn app_env_file_follows_the_contract() {
    let ctx = local("web-1");
    let recipe = render_server(&ctx).unwrap();
    let env_path = ctx.layout.etc("app").join("app.env");
    let file = recipe.file(&env_path).unwrap();
    assert!(file.contains_secret);
    // Readable by the app, which cannot rewrite it: root reads it.
    assert_eq!((file.mode, file.owner.as_str()), (0o640, "root:www-data"));
    let vars = envfile::parse(&file.contents).unwrap();
    let contract = include_str!("../../../docs/app-contract.md");
    let documented: Vec<&str> = contract
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .collect();
    assert_eq!(documented.len(), 18);
    let keys: Vec<&str> = vars.keys().map(String::as_str).collect();
    let mut sorted = documented.clone();
    sorted.sort();
    assert_eq!(keys, sorted);

    // Secrets survive the file format exactly.
    assert_eq!(
        vars["DJANGO_SECRET_KEY"],
        ctx.secrets.django_secret_key.expose()
    );
    assert_eq!(vars["DATABASE_PASSWORD"], ctx.secrets.db_password.expose());
    // Redis and RabbitMQ over TLS only, checked against the environment's CA.
    assert_eq!(
        vars["REDIS_URL"],
        "rediss://:redis%2Fpw%2B7@127.77.3.1:6380"
    );
    assert_eq!(
        vars["CELERY_BROKER_URL"],
        "amqps://surveys:rabbit%40pw%3D9@127.77.3.1:5671/surveys_local"
    );
    assert_eq!(
        vars["RIGGER_CA_CERT"],
        ctx.layout.ca_cert().to_string_lossy()
    );
    assert_eq!(vars["DATABASE_REPLICA_NAMES"], "surveys_local_replica1");
    assert_eq!(vars["RIGGER_ROLE"], "web");

    assert_eq!(
        recipe.service("gunicorn").unwrap().env_file.as_deref(),
        Some(env_path.as_path())
    );
}

/// HSTS is off unless asked for; when on, nginx sends it (`always`: errors too) on the site's
/// HTTPS server only, including the maintenance page, whose own `add_header`s would otherwise
/// hide the server's.
#[test]
fn nginx_sends_hsts_only_when_asked_and_only_over_https() {
    let nginx_conf = |ctx: &ServerContext| {
        let recipe = render_server(ctx).unwrap();
        let path = ctx.layout.etc("nginx").join("nginx.conf");
        recipe.file(&path).unwrap().contents.clone()
    };
    let mut ctx = local("web-1");
    assert!(!nginx_conf(&ctx).contains("Strict-Transport-Security"));

    ctx.project.hsts = Some(common::hsts());
    let conf = nginx_conf(&ctx);
    let header =
        r#"add_header Strict-Transport-Security "max-age=31536000; includeSubDomains" always;"#;
    assert_eq!(conf.matches(header).count(), 2, "{conf}");
    // Every server block that carries it listens with TLS.
    for block in conf.split("\n    server {").skip(1) {
        if block.contains("Strict-Transport-Security") {
            assert!(block.contains(" ssl;"), "HSTS outside HTTPS: {block}");
            assert!(
                !block.contains("default_server"),
                "HSTS for unknown hosts: {block}"
            );
        }
    }
    let maintenance = conf
        .split("location = /.rigger/maintenance.html {")
        .nth(1)
        .unwrap();
    let maintenance = maintenance.split('}').next().unwrap();
    assert!(maintenance.contains(header), "{maintenance}");

    ctx.project.hsts = Some(rigger_recipes::Hsts {
        max_age: 0,
        include_subdomains: false,
    });
    assert!(nginx_conf(&ctx).contains(r#"Strict-Transport-Security "max-age=0" always;"#));
}

#[test]
fn web_and_worker_on_one_server_merge() {
    let mut ctx = local("web-1");
    ctx.roles = vec![Role::Web, Role::Worker];
    let recipe = render_server(&ctx).unwrap();
    let names: Vec<&str> = recipe.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "stunnel",
            "pgbouncer",
            "gunicorn",
            "nginx",
            "celery-worker",
            "celery-beat"
        ]
    );
    let env = recipe.file(ctx.layout.etc("app").join("app.env")).unwrap();
    assert_eq!(
        envfile::parse(&env.contents).unwrap()["RIGGER_ROLE"],
        "web,worker"
    );
}

#[test]
fn merging_different_versions_of_a_file_is_a_conflict() {
    let ctx = local("web-1");
    let mut a = render(Role::Web, &ctx).unwrap();
    let mut b = a.clone();
    b.files[0].contents.push_str("# changed\n");
    let err = a.merge(b).unwrap_err();
    assert!(matches!(err, RenderError::Conflict { .. }), "{err}");
    a.merge(Recipe::default()).unwrap();
}

#[test]
fn rendering_a_role_the_server_lacks_is_an_error() {
    let err = render(Role::DbPrimary, &local("web-1")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "role db-primary is not one of server web-1's roles"
    );
}

#[test]
fn services_are_consistent() {
    for ctx in all_contexts() {
        let recipe = render_server(&ctx).unwrap();
        for service in &recipe.services {
            assert_eq!(service.command.user, None, "{}", service.name);
            assert!(service.command.program.starts_with('/'), "{}", service.name);
            for dep in &service.depends_on {
                assert!(
                    recipe.service(dep).is_some(),
                    "{} needs {dep}",
                    service.name
                );
            }
            if let Probe::Command(probe) = &service.readiness {
                assert!(probe.program.starts_with('/'));
            }
        }
        for step in &recipe.steps {
            assert!(step.command.program.starts_with('/'), "{}", step.name);
        }
        // Everything stays inside the layout's directories.
        let l = &ctx.layout;
        let roots = [
            &l.etc_dir,
            &l.data_dir,
            &l.log_dir,
            &l.run_dir,
            &l.home_dir,
            &l.systemd_unit_dir,
            &l.tmpfiles_dir,
        ];
        let inside = |p: &Path| roots.iter().any(|r| p.starts_with(r)) || p == l.maintenance_dir;
        for dir in &recipe.dirs {
            assert!(inside(&dir.path), "{}", dir.path.display());
        }
        for file in &recipe.files {
            assert!(inside(&file.path), "{}", file.path.display());
        }
    }
}

#[test]
fn systemd_layout_emits_a_unit_per_service() {
    for (id, _, _) in SERVERS {
        let ctx = systemd(id);
        let recipe = render_server(&ctx).unwrap();
        for service in &recipe.services {
            let unit = ctx
                .layout
                .systemd_unit_dir
                .join(format!("rigger-{}.service", service.name));
            let unit = recipe
                .file(&unit)
                .unwrap_or_else(|| panic!("{id}: no unit"));
            assert!(unit.contents.contains(&format!("User={}\n", service.user)));
        }
        let local = render_server(&local(id)).unwrap();
        assert!(
            !local
                .files
                .iter()
                .any(|f| f.path.extension() == Some("service".as_ref()))
        );
    }
}

/// Each unit's section, as `[Section]` -> its `Key=value` lines.
fn unit_sections(contents: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut sections = std::collections::BTreeMap::new();
    let mut current = String::new();
    for line in contents.lines() {
        if line.starts_with('[') {
            current = line.to_owned();
        } else if line.contains('=') && !line.starts_with('#') {
            sections
                .entry(current.clone())
                .or_insert_with(Vec::new)
                .push(line.to_owned());
        }
    }
    sections
}

/// A service that keeps failing is restarted for as long as it fails, 5 s apart: systemd's
/// default start limit (5 starts in 10 s) left one that failed fast 5 times failed for good.
#[test]
fn units_restart_for_as_long_as_they_fail_without_hammering() {
    for (id, _, _) in SERVERS {
        let recipe = render_server(&systemd(id)).unwrap();
        let units: Vec<_> = recipe
            .files
            .iter()
            .filter(|f| f.path.extension() == Some("service".as_ref()))
            .collect();
        assert!(!units.is_empty(), "{id}");
        for unit in units {
            let sections = unit_sections(&unit.contents);
            let path = unit.path.display();
            assert!(
                sections["[Unit]"].contains(&"StartLimitIntervalSec=0".to_owned()),
                "{id} {path}: no StartLimitIntervalSec=0 in [Unit]"
            );
            let service = &sections["[Service]"];
            assert!(
                service.contains(&"Restart=always".to_owned()),
                "{id} {path}"
            );
            assert!(service.contains(&"RestartSec=5s".to_owned()), "{id} {path}");
            assert!(
                !service.iter().any(|l| l.starts_with("StartLimit")),
                "{id} {path}: start limits belong in [Unit]"
            );
        }
    }
}

/// The first release's migrations at boot (AWS): as the app's user with its environment
/// file, straight to the primary over verified TLS, under the advisory lock, retried while the
/// primary boots; no secret on the line.
#[test]
fn boot_migrations_run_once_at_a_time_straight_to_the_primary() {
    let ctx = systemd("worker-1");
    let step = rigger_recipes::boot_migrations(&ctx);
    assert_eq!(step.phase, Phase::BeforeStart);
    assert_eq!(step.command.user.as_deref(), Some("www-data"));
    assert_eq!(
        step.command.cwd.as_deref(),
        Some(ctx.layout.app_dir.as_path())
    );
    let line = step.command.to_string();
    let loader = format!(
        "rigger-env {} /usr/bin/env ",
        ctx.layout.etc("app").join("app.env").display()
    );
    assert!(line.contains(&loader), "{line}");
    for variable in [
        format!("DATABASE_HOST={}", ctx.peers.db_primary.address),
        "DATABASE_PORT=5432".to_owned(),
        "DATABASE_REPLICA_NAMES=".to_owned(),
        "PGSSLMODE=verify-full".to_owned(),
        "PGSSLROOTCERT=/etc/rigger/pki/ca.crt".to_owned(),
    ] {
        // After the loader: the file's PgBouncer address must not win.
        let at = line
            .find(&format!(" {variable} "))
            .unwrap_or_else(|| panic!("{variable}: {line}"));
        assert!(
            at > line.find(&loader).unwrap(),
            "{variable} before the loader: {line}"
        );
    }
    let code = step.command.args.last().unwrap();
    assert!(
        code.contains(&format!(
            "pg_advisory_lock(%s)', [{}]); call_command('migrate', interactive=False)",
            rigger_recipes::MIGRATION_LOCK
        )),
        "{code}"
    );
    let retry = step.retry.expect("retried while the primary boots");
    assert_eq!(retry.within, rigger_recipes::PEER_WAIT);
    assert_eq!(retry.clean, None);
    for secret in secret_values(&ctx) {
        assert!(!line.contains(secret), "a secret on the migration's line");
    }
}

#[test]
fn stunnel_and_pgbouncer_reach_every_database() {
    let mut ctx = local("worker-1");
    ctx.peers
        .db_replicas
        .push(rigger_recipes::Peer::new("db-3", [127, 77, 4, 3].into()));
    let recipe = render_server(&ctx).unwrap();
    let ini = &recipe
        .file(ctx.layout.etc("pgbouncer").join("pgbouncer.ini"))
        .unwrap()
        .contents;
    for line in [
        "surveys_local = host=127.77.2.1 port=7432 dbname=surveys_local",
        "surveys_local_replica1 = host=127.77.2.1 port=7433 dbname=surveys_local",
        "surveys_local_replica2 = host=127.77.2.1 port=7434 dbname=surveys_local",
    ] {
        assert!(ini.contains(line), "{line}");
    }
    let stunnel = &recipe
        .file(ctx.layout.etc("stunnel").join("stunnel.conf"))
        .unwrap()
        .contents;
    for line in [
        "accept = 127.77.2.1:7434",
        "connect = 127.77.4.3:5432",
        "checkHost = db-3",
    ] {
        assert!(stunnel.contains(line), "{line}");
    }
}

#[test]
fn primary_keeps_a_slot_per_replica_and_replica_uses_its_own() {
    let primary = render_server(&local("db-1")).unwrap();
    let sql = primary
        .files
        .iter()
        .find(|f| f.path.ends_with("primary.sql"))
        .unwrap();
    assert!(
        sql.contents
            .contains("wanted text[] := ARRAY['rigger_db_2']::text[];")
    );
    let setup = primary.step("postgresql-setup").unwrap();
    assert_eq!(setup.phase, Phase::AfterStart);

    let replica = render_server(&local("db-2")).unwrap();
    let backup = replica.step("postgresql-basebackup").unwrap();
    assert!(
        backup
            .command
            .args
            .windows(2)
            .any(|w| w == ["-S", "rigger_db_2"])
    );
    assert!(!backup.command.args.contains(&"-C".to_owned()));
    assert_eq!(rigger_recipes::replication_slot_name("db-2"), "rigger_db_2");
}

#[test]
fn empty_backend_list_renders() {
    let mut ctx = local("lb-1");
    ctx.peers.web_backends.clear();
    let recipe = render_server(&ctx).unwrap();
    let cfg = &recipe.files[0].contents;
    assert!(cfg.contains("backend web_https") && !cfg.contains("    server "));
}

#[test]
fn invalid_values_are_refused_before_rendering() {
    type Breakage = Box<dyn Fn(&mut ServerContext)>;
    let cases: Vec<(&str, Breakage)> = vec![
        (
            "etc_dir",
            Box::new(|c| c.layout.etc_dir = "/state/with space/etc".into()),
        ),
        (
            "run_dir",
            Box::new(|c| c.layout.run_dir = "relative/run".into()),
        ),
        (
            "project.domains",
            Box::new(|c| c.project.domains = vec!["evil.com; return 200".into()]),
        ),
        ("project.domains", Box::new(|c| c.project.domains.clear())),
        ("server_id", Box::new(|c| c.server_id = "Web_1".into())),
        (
            "project.db_name",
            Box::new(|c| c.project.db_name = "x\"; DROP".into()),
        ),
        (
            "secrets.db_password",
            Box::new(|c| c.secrets.db_password = Secret::new("two\nlines")),
        ),
        (
            "secrets.redis_password",
            Box::new(|c| c.secrets.redis_password = Secret::new("")),
        ),
        (
            "secrets.django_secret_key",
            Box::new(|c| c.secrets.django_secret_key = Secret::new("a\rb")),
        ),
        (
            "tuning.postgres_shared_buffers",
            Box::new(|c| c.tuning.postgres_shared_buffers = "1GB\nfsync = off".into()),
        ),
    ];
    for (field, break_it) in cases {
        let mut ctx = local("web-1");
        break_it(&mut ctx);
        match render(Role::Web, &ctx) {
            Err(RenderError::InvalidValue {
                field: f, value, ..
            }) => {
                assert_eq!(f, field);
                if field.starts_with("secrets.") {
                    assert_eq!(value, "(secret)");
                }
            }
            other => panic!("{field}: expected InvalidValue, got {other:?}"),
        }
    }
}
