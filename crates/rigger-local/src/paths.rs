//! Where an environment lives on this machine.
//!
//! Everything rigger creates for a local environment is under one state directory, so `down
//! --purge` removes exactly that and nothing else. As root the default is
//! `/var/lib/rigger/<project>/<env>` (service users must be able to traverse every parent, which
//! rules out `/root`); otherwise `$XDG_STATE_HOME/rigger/<project>/<env>`. `RIGGER_STATE_DIR`
//! overrides the parent of `<project>/<env>`.

use std::path::{Path, PathBuf};

/// The paths of one environment's state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvPaths {
    /// Parent of every project's state (`/var/lib/rigger`): holds caches shared by all.
    base: PathBuf,
    root: PathBuf,
}

impl EnvPaths {
    /// The state directory of `project`/`environment`, from `RIGGER_STATE_DIR` or the default.
    pub fn for_environment(project: &str, environment: &str) -> Self {
        let base = match std::env::var_os("RIGGER_STATE_DIR") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ if nix::unistd::geteuid().is_root() => PathBuf::from("/var/lib/rigger"),
            _ => std::env::var_os("XDG_STATE_HOME")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state"))
                })
                .unwrap_or_else(|| PathBuf::from("/tmp"))
                .join("rigger"),
        };
        EnvPaths {
            root: base.join(project).join(environment),
            base,
        }
    }

    /// Paths rooted at `root` (its parent holds the shared caches); for tests.
    pub fn for_root_for_tests(root: &Path) -> Self {
        EnvPaths {
            base: root.parent().unwrap_or(root).to_path_buf(),
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Creates the root (mode [`crate::files::ROOT_MODE`]) if needed; call before writing
    /// anything in it.
    pub fn create_root(&self) -> std::io::Result<()> {
        crate::files::create_dir_with_mode(&self.root, crate::files::ROOT_MODE)
    }
    /// Mode 0700, one file per secret with mode 0600.
    pub fn secrets(&self) -> PathBuf {
        self.root.join("secrets")
    }
    /// The environment's certificate authority and every server's certificate.
    pub fn pki(&self) -> PathBuf {
        self.root.join("pki")
    }
    pub fn servers(&self) -> PathBuf {
        self.root.join("servers")
    }
    pub fn server(&self, id: &str) -> PathBuf {
        self.servers().join(id)
    }
    /// Files shared by every server of the environment (media, static, the app's code).
    pub fn shared(&self) -> PathBuf {
        self.root.join("shared")
    }
    pub fn releases(&self) -> PathBuf {
        self.root.join("releases")
    }
    pub fn release(&self, id: &str) -> PathBuf {
        self.releases().join(id)
    }
    /// App venvs, one per distinct requirements file, shared by every environment (and
    /// kept by `down --purge`, which deletes only the environment's own directory).
    pub fn venvs(&self) -> PathBuf {
        self.base.join("venvs")
    }
    pub fn media(&self) -> PathBuf {
        self.shared().join("media")
    }
    pub fn static_root(&self) -> PathBuf {
        self.shared().join("static")
    }
    /// Files in it switch every web server to maintenance (see the nginx recipe).
    pub fn maintenance(&self) -> PathBuf {
        self.shared().join("maintenance")
    }
    /// The supervisor's lock: held (flock) while it runs; its text says who holds it.
    pub fn supervisor_lock(&self) -> PathBuf {
        self.root.join("supervisor.lock")
    }
    /// The keeper's record: who it is, and how often and why it restarted the supervisor.
    pub fn keeper(&self) -> PathBuf {
        self.root.join("keeper.json")
    }

    pub fn supervisor_log(&self) -> PathBuf {
        self.root.join("supervisor.log")
    }
    /// What the user asked for beyond rigger.toml (`rigger scale`), read by the supervisor.
    pub fn desired(&self) -> PathBuf {
        self.root.join("desired.json")
    }
    /// A failover's promotion in progress, from just before the promotion until the switch
    /// is recorded in the registry (`supervisor::database::Promotion`).
    pub fn promotion(&self) -> PathBuf {
        self.root.join("promotion.json")
    }
    /// The supervisor's record of servers, written after every change.
    pub fn registry(&self) -> PathBuf {
        self.root.join("registry.json")
    }
    /// The supervisor's latest view of every process and of the load balancer.
    pub fn status(&self) -> PathBuf {
        self.root.join("status.json")
    }
}
