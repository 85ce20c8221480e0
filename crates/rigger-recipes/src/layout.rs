//! [`Layout`]: where things live on a server, who runs them and which binaries run them.
//!
//! Recipes never hard-code a host path, a user name or a binary: they ask the layout. The local
//! provider puts every server in its own directory ([`Layout::local`]); the AWS provider uses
//! the usual system directories and systemd ([`Layout::systemd`]). Each component gets a
//! subdirectory named after it under the per-server directories, e.g. `etc/nginx`,
//! `log/postgresql`, `run/pgbouncer`.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// Paths, users, binaries and service manager of one server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub service_manager: ServiceManager,

    /// Configuration, one subdirectory per component (`etc/nginx/nginx.conf`).
    pub etc_dir: PathBuf,
    /// Persistent state (`data/postgresql` is PGDATA).
    pub data_dir: PathBuf,
    /// Logs, one subdirectory per component, plus `<service>.log` files for the stdout and
    /// stderr of supervised services (local provider).
    pub log_dir: PathBuf,
    /// Sockets, pid files and temporary files; may be emptied at boot.
    pub run_dir: PathBuf,
    /// Home directories of the service users, `home/<user>` (RabbitMQ keeps its Erlang
    /// cookie there).
    pub home_dir: PathBuf,
    /// This server's TLS certificate and key: `server.crt`, `server.key` (0600, root),
    /// signed by the environment CA (see [`crate::pki`]).
    pub tls_dir: PathBuf,
    /// Where maintenance switches are dropped on a web server: `healthcheck.html` (served for
    /// the health path when present) and `maintenance.html` (a 503 page for everything else).
    pub maintenance_dir: PathBuf,

    /// The Django project (`manage.py`) of the release this server runs.
    pub app_dir: PathBuf,
    /// The virtualenv of that release (`bin/gunicorn`, `bin/celery`).
    pub venv_dir: PathBuf,
    pub media_root: PathBuf,
    pub static_root: PathBuf,
    /// The environment's public PKI: `ca.crt` (the CA every server trusts).
    pub pki_dir: PathBuf,

    /// Where [`ServiceManager::Systemd`] units are written.
    pub systemd_unit_dir: PathBuf,
    /// Where the `tmpfiles.d` entries that recreate run directories at boot are written.
    pub tmpfiles_dir: PathBuf,

    pub users: ServiceUsers,
    pub bins: Binaries,
}

/// Who supervises services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceManager {
    /// rigger's own supervisor (local provider): it runs [`crate::ServiceSpec`]s directly.
    Rigger,
    /// systemd: [`crate::render`] also emits a unit per service and a `tmpfiles.d` file.
    Systemd,
}

/// The system users services run as. Each has a group of the same name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceUsers {
    pub postgres: String,
    /// nginx workers, gunicorn, Celery.
    pub www: String,
    pub redis: String,
    /// RabbitMQ and epmd.
    pub rabbitmq: String,
    /// HAProxy's workers (its master runs as root to bind any port).
    pub haproxy: String,
    pub pgbouncer: String,
    pub stunnel: String,
    /// Builds the app's venv (pip runs the dependencies' build code): never root, never a
    /// service user, and owning nothing once a build ends (the venv is then root's). Not a
    /// Debian package's user: rigger creates it.
    pub build: String,
}

/// Absolute paths of the programs recipes run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Binaries {
    /// PostgreSQL's server binaries: `postgres`, `initdb`, `pg_basebackup`, `psql`, `pg_isready`.
    pub postgres_bin_dir: PathBuf,
    /// `rabbitmq-server`, `rabbitmqctl` (the scripts, not the `/usr/sbin` wrappers that `su`).
    pub rabbitmq_bin_dir: PathBuf,
    pub nginx: PathBuf,
    pub haproxy: PathBuf,
    pub pgbouncer: PathBuf,
    pub stunnel: PathBuf,
    pub redis_server: PathBuf,
    pub epmd: PathBuf,
    pub openssl: PathBuf,
    /// coreutils `install`, `touch`; util-linux `kill` for systemd's `ExecReload`.
    pub install: PathBuf,
    pub touch: PathBuf,
    pub kill: PathBuf,
}

impl Layout {
    /// The local provider's layout: per-server directories under `server_dir`
    /// (`etc`, `data`, `log`, `run`, `home`, `etc/tls`, `data/maintenance`), the environment's
    /// shared directories under `shared_dir` (`app`, `venv`, `media`, `static`, `pki`), services
    /// supervised by rigger, Debian's users and binaries.
    pub fn local(server_dir: impl AsRef<Path>, shared_dir: impl AsRef<Path>) -> Layout {
        let server = server_dir.as_ref();
        let shared = shared_dir.as_ref();
        Layout {
            service_manager: ServiceManager::Rigger,
            etc_dir: server.join("etc"),
            data_dir: server.join("data"),
            log_dir: server.join("log"),
            run_dir: server.join("run"),
            home_dir: server.join("home"),
            tls_dir: server.join("etc/tls"),
            maintenance_dir: server.join("data/maintenance"),
            app_dir: shared.join("app"),
            venv_dir: shared.join("venv"),
            media_root: shared.join("media"),
            static_root: shared.join("static"),
            pki_dir: shared.join("pki"),
            systemd_unit_dir: server.join("etc/systemd/system"),
            tmpfiles_dir: server.join("etc/tmpfiles.d"),
            users: ServiceUsers::debian(),
            bins: Binaries::debian(),
        }
    }

    /// A systemd host's layout (AWS): `/etc/rigger`, `/var/lib/rigger`, `/var/log/rigger`,
    /// `/run/rigger`, homes in `/var/lib/rigger/home`, the project's code and files in
    /// `/srv/<project>/{app,venv,media,static}`, the CA in `/etc/rigger/pki`.
    pub fn systemd(project: &str) -> Layout {
        let srv = Path::new("/srv").join(project);
        Layout {
            service_manager: ServiceManager::Systemd,
            etc_dir: "/etc/rigger".into(),
            data_dir: "/var/lib/rigger".into(),
            log_dir: "/var/log/rigger".into(),
            run_dir: "/run/rigger".into(),
            home_dir: "/var/lib/rigger/home".into(),
            tls_dir: "/etc/rigger/tls".into(),
            maintenance_dir: "/var/lib/rigger/maintenance".into(),
            app_dir: srv.join("app"),
            venv_dir: srv.join("venv"),
            media_root: srv.join("media"),
            static_root: srv.join("static"),
            pki_dir: "/etc/rigger/pki".into(),
            systemd_unit_dir: "/etc/systemd/system".into(),
            tmpfiles_dir: "/etc/tmpfiles.d".into(),
            users: ServiceUsers::debian(),
            bins: Binaries::debian(),
        }
    }

    /// `etc/<component>`.
    pub fn etc(&self, component: &str) -> PathBuf {
        self.etc_dir.join(component)
    }

    /// `data/<component>`.
    pub fn data(&self, component: &str) -> PathBuf {
        self.data_dir.join(component)
    }

    /// `log/<component>`.
    pub fn log(&self, component: &str) -> PathBuf {
        self.log_dir.join(component)
    }

    /// `run/<component>`.
    pub fn run(&self, component: &str) -> PathBuf {
        self.run_dir.join(component)
    }

    /// `home/<user>`.
    pub fn home(&self, user: &str) -> PathBuf {
        self.home_dir.join(user)
    }

    /// Where a supervised service's stdout and stderr go: `log/<service>.log`.
    pub fn service_log(&self, service: &str) -> PathBuf {
        self.log_dir.join(format!("{service}.log"))
    }

    /// The environment CA's certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.pki_dir.join("ca.crt")
    }

    /// This server's certificate.
    pub fn tls_cert(&self) -> PathBuf {
        self.tls_dir.join("server.crt")
    }

    /// This server's private key.
    pub fn tls_key(&self) -> PathBuf {
        self.tls_dir.join("server.key")
    }

    /// Every path of the layout, with a name, for validation.
    pub(crate) fn named_paths(&self) -> Vec<(&'static str, &Path)> {
        let b = &self.bins;
        vec![
            ("etc_dir", &self.etc_dir),
            ("data_dir", &self.data_dir),
            ("log_dir", &self.log_dir),
            ("run_dir", &self.run_dir),
            ("home_dir", &self.home_dir),
            ("tls_dir", &self.tls_dir),
            ("maintenance_dir", &self.maintenance_dir),
            ("app_dir", &self.app_dir),
            ("venv_dir", &self.venv_dir),
            ("media_root", &self.media_root),
            ("static_root", &self.static_root),
            ("pki_dir", &self.pki_dir),
            ("systemd_unit_dir", &self.systemd_unit_dir),
            ("tmpfiles_dir", &self.tmpfiles_dir),
            ("bins.postgres_bin_dir", &b.postgres_bin_dir),
            ("bins.rabbitmq_bin_dir", &b.rabbitmq_bin_dir),
            ("bins.nginx", &b.nginx),
            ("bins.haproxy", &b.haproxy),
            ("bins.pgbouncer", &b.pgbouncer),
            ("bins.stunnel", &b.stunnel),
            ("bins.redis_server", &b.redis_server),
            ("bins.epmd", &b.epmd),
            ("bins.openssl", &b.openssl),
            ("bins.install", &b.install),
            ("bins.touch", &b.touch),
            ("bins.kill", &b.kill),
        ]
        .into_iter()
        .map(|(name, path)| (name, path.as_path()))
        .collect()
    }
}

impl ServiceUsers {
    /// The users Debian's packages create.
    pub fn debian() -> ServiceUsers {
        ServiceUsers {
            postgres: "postgres".into(),
            www: "www-data".into(),
            redis: "redis".into(),
            rabbitmq: "rabbitmq".into(),
            haproxy: "haproxy".into(),
            pgbouncer: "postgres".into(),
            stunnel: "stunnel4".into(),
            build: "rigger-build".into(),
        }
    }

    pub(crate) fn named(&self) -> [(&'static str, &str); 8] {
        [
            ("users.postgres", &self.postgres),
            ("users.www", &self.www),
            ("users.redis", &self.redis),
            ("users.rabbitmq", &self.rabbitmq),
            ("users.haproxy", &self.haproxy),
            ("users.pgbouncer", &self.pgbouncer),
            ("users.stunnel", &self.stunnel),
            ("users.build", &self.build),
        ]
    }
}

impl Binaries {
    /// Debian 12 (bookworm) with PostgreSQL 15.
    pub fn debian() -> Binaries {
        Binaries {
            postgres_bin_dir: "/usr/lib/postgresql/15/bin".into(),
            rabbitmq_bin_dir: "/usr/lib/rabbitmq/bin".into(),
            nginx: "/usr/sbin/nginx".into(),
            haproxy: "/usr/sbin/haproxy".into(),
            pgbouncer: "/usr/sbin/pgbouncer".into(),
            stunnel: "/usr/bin/stunnel4".into(),
            redis_server: "/usr/bin/redis-server".into(),
            epmd: "/usr/bin/epmd".into(),
            openssl: "/usr/bin/openssl".into(),
            install: "/usr/bin/install".into(),
            touch: "/usr/bin/touch".into(),
            kill: "/usr/bin/kill".into(),
        }
    }
}
