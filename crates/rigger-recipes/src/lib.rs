//! Recipes: what each role of the architecture needs on a server, as data.
//!
//! [`render`]`(role, &ServerContext)` returns a [`Recipe`]: directories ([`DirSpec`]), whole
//! files ([`FileSpec`]), long-running foreground services ([`ServiceSpec`], with a readiness
//! [`Probe`] and stop/reload [`Signal`]s) and one-shot idempotent steps ([`StepSpec`]). Every
//! program to run is a [`Command`] value whose `Display` is a shell line. Providers apply
//! recipes; this crate does no I/O, reads no clock and draws no random numbers, so the same
//! context always renders the same recipe, and tests compare it as text.
//!
//! The same recipes serve both providers. Everything host-specific comes from the context's
//! [`Layout`]: per-server directories, shared app paths, service users, binary paths and the
//! [`ServiceManager`]. [`Layout::local`] puts each server in its own directory, supervised by
//! rigger; [`Layout::systemd`] uses `/etc/rigger`, `/var/lib/rigger`, ... and makes [`render`]
//! also emit systemd units ([`systemd_unit`]).
//!
//! Start reading at [`render`] (in `roles/mod.rs`), then one role module (`roles/app.rs` is
//! the web and worker servers) and its template under `templates/`.
//!
//! # Rules every recipe follows
//! - **Secrets only in files.** Secret values ([`Secret`]) appear only in [`FileSpec`]s with
//!   `contains_secret` and mode 0600 (or 0640, root's, for a file root reads too: the app's
//!   environment), never in a [`Command`]'s arguments or environment: the app gets its
//!   settings from an `EnvironmentFile` ([`ServiceSpec::env_file`], format in [`envfile`]),
//!   PgBouncer from its `auth_file`, replicas from a libpq passfile.
//! - **Foreground services.** No service daemonizes; the supervisor's child is the service.
//!   Readiness is a probe (a port, a TLS handshake, `pg_isready`, `rabbitmqctl await_startup`),
//!   never a sleep.
//! - **Whole files.** Config files are rendered whole from templates, never patched.
//!   Templates run with minijinja's strict undefined behaviour: a missing variable is an error.
//! - **Validated inputs.** Values inserted into configs (names, paths, secrets) are checked
//!   first so that none can change a file's structure ([`RenderError::InvalidValue`]).
//!
//! # Conventions
//! Components live in `<dir>/<component>` of the layout's per-server directories
//! (`etc/nginx/nginx.conf`, `data/postgresql` = PGDATA, `run/postgresql` = the socket
//! directory). A supervised service's stdout and stderr go to `log/<service>.log`; most
//! services log there (nginx writes `log/nginx/{error,access}.log`, RabbitMQ `log/rabbitmq`).
//! Ports are in [`Ports`] (nginx 80/443, gunicorn 8000, PgBouncer 6432, stunnel 7432 + N,
//! PostgreSQL 5432, Redis over TLS 6380, AMQPS 5671, Erlang distribution 25672, epmd 4369). Every
//! service listens on the server's own address, never on a wildcard, so that the local
//! provider can give each server its own loopback address.
//!
//! # Choices, and why
//! - **App environment through `env_file`.** `app.env` (0640, root's, group www) is named in
//!   [`ServiceSpec::env_file`]: systemd loads it with `EnvironmentFile=`, rigger's supervisor
//!   with [`envfile::parse`], which reads exactly the syntax [`envfile`] writes. An `env`
//!   wrapper could not read a file, and a wrapper script would hide the command line.
//! - **PostgreSQL's configuration is rigger's whole file** in `etc/postgresql`, passed as
//!   `-c config_file=`, rather than an `include` appended to initdb's file: nothing is
//!   patched, and a replica's `pg_basebackup` copies no configuration or key of the primary.
//!   The key is copied from the server's TLS directory for the postgres user at every apply.
//! - **Replication slots belong to the primary** (`rigger_<replica id>`, created and pruned by
//!   its AfterStart SQL), so a replica's `pg_basebackup -S` uses an existing slot instead of
//!   `-C`, and a failed base backup can be retried.
//! - **The load balancer** (HAProxy, local only) forwards its http port to the web servers'
//!   port 80 as the seed's load balancer did (nginx redirects to https), and checks nginx's
//!   certificate against the environment CA (`verify required`) rather than `verify none`.
//!   Its certificate and key stay separate files (`ssl-load-extra-del-ext`).
//! - **Redis and RabbitMQ speak TLS only** (Redis `port 0` with a `tls-port`, RabbitMQ
//!   `listeners.tcp = none` with an AMQPS listener), with the server's certificate signed by
//!   the environment CA, as PostgreSQL's is; the app's URLs are `rediss://` and `amqps://` and
//!   `RIGGER_CA_CERT` names the CA to check them against. Each service reads its own copy of
//!   the key ([`Builder::server_tls_copy`](roles)), as PostgreSQL does.
//! - **Redis keeps nothing on disk** (`save ""`, no AOF): it is a cache and a session store
//!   that rigger may replace at any time.
//! - **Service users get `HOME`** in their command's environment (the layout's
//!   `home/<user>`): the local supervisor runs as root, whose `HOME` they cannot read.

mod command;
mod context;
mod engine;
pub mod envfile;
mod error;
mod layout;
pub mod operations;
pub mod pki;
mod roles;
mod spec;
pub mod sql;
mod systemd;
mod validate;

pub use command::{Command, ENV_FILE_SCRIPT, shell_quote};
pub use context::{
    Hsts, Network, PGBOUNCER_ADMIN_USER, Peer, Peers, Ports, ProjectInfo, Role, Secret, Secrets,
    ServerContext, Tuning,
};
pub use error::RenderError;
pub use layout::{Binaries, Layout, ServiceManager, ServiceUsers};
pub use roles::{
    MAX_WAL_SENDERS, MIGRATION_LOCK, app_env_file, boot_migrations, collect_static,
    pgbouncer_admin_env, primary_direct_env, render, render_server, slot_name,
};
pub use spec::{
    DirSpec, FileSpec, PEER_WAIT, Phase, Probe, Recipe, Retry, ServiceSpec, Signal, StepSpec,
};
pub use sql::{quote_ident, quote_literal};
pub use systemd::{systemd_unit, unit_name};

/// The name of the replication slot the primary keeps for replica `server_id`.
pub fn replication_slot_name(server_id: &str) -> String {
    roles::slot_name(server_id)
}
