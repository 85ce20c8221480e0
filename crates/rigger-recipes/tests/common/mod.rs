//! A fixed sample environment, `surveys` / `local`, on 127.77.0.0/16:
//! lb-1, web-1, web-2, worker-1, cache-1 (cache + queue), db-1 (primary), db-2 (replica).
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::Path;

use rigger_recipes::{
    Hsts, Layout, Network, Peer, Peers, Ports, ProjectInfo, Role, Secret, Secrets, ServerContext,
    Tuning,
};

/// Every server of the sample environment: id, address, roles.
pub const SERVERS: &[(&str, [u8; 4], &[Role])] = &[
    ("lb-1", [127, 77, 0, 1], &[Role::Lb]),
    ("web-1", [127, 77, 1, 1], &[Role::Web]),
    ("web-2", [127, 77, 1, 2], &[Role::Web]),
    ("worker-1", [127, 77, 2, 1], &[Role::Worker]),
    ("cache-1", [127, 77, 3, 1], &[Role::Cache, Role::Queue]),
    ("db-1", [127, 77, 4, 1], &[Role::DbPrimary]),
    ("db-2", [127, 77, 4, 2], &[Role::DbReplica]),
];

/// Secrets with characters that need quoting or encoding in some formats.
pub fn secrets() -> Secrets {
    Secrets {
        db_password: Secret::new("db:pw@1/2%x"),
        replication_password: Secret::new("repl-pw-5e6f"),
        redis_password: Secret::new("redis/pw+7"),
        rabbitmq_password: Secret::new("rabbit@pw=9"),
        django_secret_key: Secret::new("dj$ngo 'key' \"#1\\"),
        pgbouncer_admin_password: Secret::new("pgb-admin@pw/3"),
    }
}

/// The address of `id` in the block `127.<block>.0.0/16`.
pub fn addr_in(block: u8, id: &str) -> Ipv4Addr {
    let (_, [a, _, c, d], _) = SERVERS.iter().find(|(i, _, _)| *i == id).unwrap();
    Ipv4Addr::new(*a, block, *c, *d)
}

/// The local provider's layout for `id` under `root`.
pub fn local_layout(root: &Path, id: &str) -> Layout {
    Layout::local(root.join("servers").join(id), root.join("shared"))
}

/// Server `id` of the sample environment with `layout`.
pub fn context(id: &str, layout: Layout) -> ServerContext {
    context_in(77, id, layout)
}

/// Server `id` of the sample environment in the address block `127.<block>.0.0/16`.
pub fn context_in(block: u8, id: &str, layout: Layout) -> ServerContext {
    let (_, _, roles) = SERVERS.iter().find(|(i, _, _)| *i == id).unwrap();
    let addr = |id: &str| addr_in(block, id);
    let peer = |id: &str| Peer::new(id, addr(id));
    ServerContext {
        server_id: id.into(),
        address: addr(id),
        roles: roles.to_vec(),
        layout,
        project: ProjectInfo {
            name: "surveys".into(),
            environment: "local".into(),
            wsgi_module: "surveys.wsgi:application".into(),
            celery_app: "surveys".into(),
            domains: vec!["surveys.example.com".into(), ".surveys.example.org".into()],
            extra_server_names: vec![addr("lb-1").to_string()],
            health_check_path: "/healthcheck.html".into(),
            release: "initial".into(),
            db_name: "surveys_local".into(),
            db_user: "surveys".into(),
            replication_user: "replicator".into(),
            amqp_user: "surveys".into(),
            amqp_vhost: "surveys_local".into(),
            hsts: None,
        },
        ports: Ports {
            lb_http: 8080,
            lb_https: 8443,
            ..Ports::default()
        },
        peers: Peers {
            db_primary: peer("db-1"),
            db_replicas: vec![peer("db-2")],
            redis: addr("cache-1"),
            amqp: addr("cache-1"),
            web_backends: vec![peer("web-1"), peer("web-2")],
            db_client_networks: ["web-1", "web-2", "worker-1"]
                .map(|id| Network::host(addr(id)))
                .to_vec(),
            db_replication_networks: vec![
                Network::host(Ipv4Addr::LOCALHOST),
                Network::host(addr("db-1")),
                Network::host(addr("db-2")),
            ],
            load_balancer_networks: vec![Network::host(addr("lb-1"))],
        },
        secrets: secrets(),
        tuning: Tuning {
            gunicorn_workers: 2,
            celery_concurrency: 2,
            nginx_worker_processes: Some(1),
            postgres_shared_buffers: "32MB".into(),
            redis_maxmemory: Some("64mb".into()),
            rabbitmq_memory_limit: Some("512MB".into()),
            ..Tuning::default()
        },
        start_epmd: true,
        celery_beat: true,
    }
}

/// The sample server `id` with the local layout under `/state/surveys-local`.
pub fn local(id: &str) -> ServerContext {
    context(id, local_layout(Path::new("/state/surveys-local"), id))
}

/// The sample server `id` on a systemd host, with HSTS on (as a production site would be).
pub fn systemd(id: &str) -> ServerContext {
    // As on AWS: the queue server runs rigger's own epmd there too.
    let mut ctx = context(id, Layout::systemd("surveys"));
    ctx.project.hsts = Some(hsts());
    ctx
}

/// A year of HSTS, subdomains included.
pub fn hsts() -> Hsts {
    Hsts {
        max_age: 31_536_000,
        include_subdomains: true,
    }
}
