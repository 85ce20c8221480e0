//! PostgreSQL 15, primary and streaming replica.
//!
//! The configuration lives in `etc/postgresql` (rendered whole: `postgresql.conf`,
//! `pg_hba.conf`, `pg_ident.conf`, the server's certificate and key), not in the data
//! directory: the server starts as `postgres -D DATA -c config_file=etc/postgresql.conf`. So
//! nothing is patched with sed (FabulAWS's mistake), and a replica's `pg_basebackup`, which
//! copies the primary's data directory, brings no configuration or key of the primary along.
//!
//! Replication slots are the primary's business: its AfterStart SQL creates `rigger_<id>` for
//! each replica in [`crate::Peers::db_replicas`] and drops rigger's inactive slots of replicas
//! that left. A replica's `pg_basebackup` uses its slot without `-C`, so a failed base backup
//! can simply be retried: it is marked [`crate::Retry`], for servers that boot together with
//! their primary (AWS), whose base backup may come before the primary is up or set up.
//! Adding a replica therefore means re-applying the primary first, which adding its
//! `pg_hba.conf` line requires anyway.

use std::time::Duration;

use minijinja::{Value, context};

use super::{Builder, s, service, sj};
use crate::engine::{conninfo_value, pgpass_field};
use crate::error::RenderError;
use crate::{Command, Network, PEER_WAIT, Phase, Probe, Retry, ServiceSpec, Signal};

/// PostgreSQL's `max_wal_senders` and `max_replication_slots` on every database server. Each
/// streaming replica holds one WAL sender and one slot; a replica being rebuilt takes two
/// senders (its base backup and its WAL stream). rigger.toml's limit on replicas
/// (`rigger_config::DatabaseConfig::MAX_REPLICAS`) is derived from it.
pub const MAX_WAL_SENDERS: u32 = 10;

pub(super) fn primary(b: &mut Builder) -> Result<(), RenderError> {
    let ctx = b.ctx;
    let l = b.layout();
    let pg = &l.users.postgres;
    let data = l.data("postgresql");
    dirs(b);

    b.step(
        "postgresql-initdb",
        Phase::BeforeStart,
        pg_command(b, "initdb")
            .args(["-D", &s(&data)])
            .args(["-U", pg])
            .args(["--auth-local=peer", "--auth-host=scram-sha-256"])
            .args(["-E", "UTF8", "--locale=C.UTF-8"]),
        Some(data.join("PG_VERSION")),
    );
    server(b, Value::from(()))?;

    let p = &ctx.project;
    let slots: Vec<String> = ctx
        .peers
        .db_replicas
        .iter()
        .map(|r| slot_name(&r.id))
        .collect();
    let sql = b.template(
        "primary.sql",
        context! {
            db_name => &p.db_name,
            db_user => &p.db_user,
            db_password => ctx.secrets.db_password.expose(),
            replication_user => &p.replication_user,
            replication_password => ctx.secrets.replication_password.expose(),
            slots,
            slot_prefix_like => format!("{}%", SLOT_PREFIX.replace('_', r"\_")),
        },
    )?;
    let sql_path = l.etc("postgresql").join("primary.sql");
    b.secret_file(sql_path.clone(), sql, pg);
    b.step(
        "postgresql-setup",
        Phase::AfterStart,
        psql(b).args(["-f", &s(&sql_path)]),
        None,
    );
    Ok(())
}

pub(super) fn replica(b: &mut Builder) -> Result<(), RenderError> {
    let ctx = b.ctx;
    let l = b.layout();
    let pg = &l.users.postgres;
    let data = l.data("postgresql");
    dirs(b);

    let primary = &ctx.peers.db_primary;
    let p = &ctx.project;
    let passfile = l.etc("postgresql").join("replication.pgpass");
    let pass = format!(
        "{}:{}:*:{}:{}\n",
        primary.address,
        ctx.ports.postgres,
        pgpass_field(&p.replication_user),
        pgpass_field(ctx.secrets.replication_password.expose()),
    );
    b.secret_file(passfile.clone(), pass, pg);

    // Certificate checked against the CA and the primary's address (an IP SAN).
    let conninfo = [
        ("host", primary.address.to_string()),
        ("port", ctx.ports.postgres.to_string()),
        ("user", p.replication_user.clone()),
        ("passfile", s(&passfile)),
        ("sslmode", "verify-full".to_owned()),
        ("sslrootcert", s(&l.ca_cert())),
        ("application_name", ctx.server_id.clone()),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={}", conninfo_value(v)))
    .collect::<Vec<_>>()
    .join(" ");
    let slot = slot_name(&ctx.server_id);

    // The primary may still be booting (servers launched together boot in any order): refused
    // connections, no `replicator` or no slot yet until its setup SQL ran. Retried, with the
    // data directory emptied between attempts, by a provider that cannot order the servers.
    b.step(
        "postgresql-basebackup",
        Phase::BeforeStart,
        pg_command(b, "pg_basebackup")
            .args(["-D", &s(&data)])
            .args(["-d", &conninfo])
            .args(["-X", "stream", "-S", &slot, "--checkpoint=fast", "-w"]),
        Some(data.join("PG_VERSION")),
    )
    .retry = Some(Retry {
        within: PEER_WAIT,
        clean: Some(data.clone()),
    });
    // Every apply: a server rendered as a replica is a standby. Promotion makes it a primary
    // (and removes the file); rigger then renders it as one.
    b.step(
        "postgresql-standby-signal",
        Phase::BeforeStart,
        Command::new(s(&l.bins.touch))
            .arg(sj(&data, "standby.signal"))
            .user(pg),
        None,
    );
    server(b, context! { conninfo, slot })
}

/// Prefix of the replication slots rigger manages.
const SLOT_PREFIX: &str = "rigger_";

/// `rigger_<id>` with `-` as `_` (slot names allow lower-case letters, digits and `_`).
pub fn slot_name(server_id: &str) -> String {
    format!("{SLOT_PREFIX}{}", server_id.replace('-', "_"))
}

fn dirs(b: &mut Builder) {
    let l = b.layout();
    let pg = &l.users.postgres;
    // Root's: root writes the configuration and copies the key here, so postgres must not be
    // able to swap a name in it for a link (it reads its files, owns none of the entries).
    b.dir(l.etc("postgresql"), 0o755, "root");
    b.dir(l.data("postgresql"), 0o700, pg);
    b.dir(l.run("postgresql"), 0o755, pg);
    b.dir(l.home(pg), 0o700, pg);
}

/// Files, TLS steps and service common to primary and replica; `standby` is undefined-free
/// `none` for a primary.
fn server(b: &mut Builder, standby: Value) -> Result<(), RenderError> {
    let ctx = b.ctx;
    let l = b.layout();
    let pg = &l.users.postgres;
    let etc = l.etc("postgresql");
    let run = l.run("postgresql");
    let data = l.data("postgresql");
    let p = &ctx.project;
    let role = if standby.is_none() {
        "primary"
    } else {
        "replica"
    };

    let conf = b.template(
        "postgresql.conf",
        context! {
            role,
            hba_file => sj(&etc, "pg_hba.conf"),
            ident_file => sj(&etc, "pg_ident.conf"),
            port => ctx.ports.postgres,
            socket_dir => s(&run),
            max_connections => ctx.tuning.postgres_max_connections,
            ssl_cert_file => sj(&etc, "server.crt"),
            ssl_key_file => sj(&etc, "server.key"),
            shared_buffers => &ctx.tuning.postgres_shared_buffers,
            max_slot_wal_keep_size => &ctx.tuning.postgres_max_slot_wal_keep_size,
            max_wal_senders => MAX_WAL_SENDERS,
            standby,
        },
    )?;
    let conf_path = etc.join("postgresql.conf");
    b.file(conf_path.clone(), conf, 0o644, pg);

    let peers = &ctx.peers;
    let to_text = |nets: &[Network]| nets.iter().map(Network::to_string).collect::<Vec<_>>();
    let hba = b.template(
        "pg_hba.conf",
        context! {
            superuser => pg,
            db_name => &p.db_name,
            db_user => &p.db_user,
            replication_user => &p.replication_user,
            client_networks => to_text(&peers.db_client_networks),
            replication_networks => to_text(&peers.db_replication_networks),
        },
    )?;
    b.file(etc.join("pg_hba.conf"), hba, 0o640, pg);
    b.file(
        etc.join("pg_ident.conf"),
        "# No user name maps: rendered by rigger.\n".into(),
        0o640,
        pg,
    );

    // PostgreSQL wants its key owned by its user; the server's key in the TLS directory is
    // root's.
    b.server_tls_copy("postgresql", &etc, pg);

    let mut postgres = pg_command(b, "postgres")
        .args(["-D", &s(&data)])
        .args(["-c", &format!("config_file={}", s(&conf_path))]);
    postgres.user = None;
    let ready = pg_command(b, "pg_isready")
        .args(["-q", "-h", &s(&run)])
        .args(["-p", &ctx.ports.postgres.to_string()])
        .args(["-U", pg, "-d", "postgres"]);
    b.service(ServiceSpec {
        // SIGINT is PostgreSQL's fast shutdown: clients are disconnected, nothing is lost.
        stop_signal: Signal::Int,
        stop_timeout: Duration::from_secs(60),
        reload_signal: Some(Signal::Hup),
        ..service(l, "postgresql", pg, postgres, Probe::Command(ready))
    });
    Ok(())
}

/// psql as the superuser over the Unix socket, stopping at the first error.
fn psql(b: &Builder) -> Command {
    let l = b.layout();
    pg_command(b, "psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", &s(&l.run("postgresql"))])
        .args(["-p", &b.ctx.ports.postgres.to_string()])
        .args(["-U", &l.users.postgres, "-d", "postgres"])
}

/// A PostgreSQL program run as the postgres user, with `HOME` set to that user's home in the
/// layout: libpq reads `~/.postgresql` (client certificates) and the runner's own `HOME`
/// (root's) is not readable by postgres.
fn pg_command(b: &Builder, program: &str) -> Command {
    crate::operations::postgres_program(b.layout(), program)
}
