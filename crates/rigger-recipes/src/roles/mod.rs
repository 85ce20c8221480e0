//! One module per role; [`render`] dispatches. Each role function fills a [`Builder`], which
//! knows the layout and enforces the crate's file rules (secrets only in 0600 files).

mod app;
mod cache;
mod lb;
mod postgres;

pub use app::{
    MIGRATION_LOCK, app_env_file, boot_migrations, collect_static, pgbouncer_admin_env,
    primary_direct_env,
};
pub use postgres::{MAX_WAL_SENDERS, slot_name};
mod queue;

use std::path::{Path, PathBuf};
use std::time::Duration;

use minijinja::Value;

use crate::error::RenderError;
use crate::{
    Command, DirSpec, FileSpec, Layout, Phase, Probe, Recipe, Role, ServerContext, ServiceManager,
    ServiceSpec, Signal, StepSpec, engine, systemd, validate,
};

/// Renders what `role` needs on the server described by `ctx`: directories, files, services
/// and steps. With [`ServiceManager::Systemd`], also a unit per service and a `tmpfiles.d`
/// file that recreates the role's run directories at boot.
///
/// Pure: the same context always gives the same recipe.
pub fn render(role: Role, ctx: &ServerContext) -> Result<Recipe, RenderError> {
    if !ctx.roles.contains(&role) {
        return Err(RenderError::RoleNotOnServer {
            role,
            server: ctx.server_id.clone(),
        });
    }
    validate::context(ctx)?;
    let mut b = Builder::new(ctx);
    match role {
        Role::Lb => lb::render(&mut b)?,
        Role::Web => app::web(&mut b)?,
        Role::Worker => app::worker(&mut b)?,
        Role::Cache => cache::render(&mut b)?,
        Role::Queue => queue::render(&mut b)?,
        Role::DbPrimary => postgres::primary(&mut b)?,
        Role::DbReplica => postgres::replica(&mut b)?,
    }
    let mut recipe = b.recipe;
    if ctx.layout.service_manager == ServiceManager::Systemd {
        systemd::add_units(&mut recipe, role, &ctx.layout)?;
    }
    Ok(recipe)
}

/// Renders every role of the server and merges them (see [`Recipe::merge`]).
pub fn render_server(ctx: &ServerContext) -> Result<Recipe, RenderError> {
    let mut recipe = Recipe::default();
    for &role in &ctx.roles {
        recipe.merge(render(role, ctx)?)?;
    }
    Ok(recipe)
}

/// Collects a role's recipe.
pub(crate) struct Builder<'a> {
    pub ctx: &'a ServerContext,
    pub recipe: Recipe,
}

impl<'a> Builder<'a> {
    fn new(ctx: &'a ServerContext) -> Builder<'a> {
        Builder {
            ctx,
            recipe: Recipe::default(),
        }
    }

    pub fn layout(&self) -> &'a Layout {
        &self.ctx.layout
    }

    pub fn dir(&mut self, path: PathBuf, mode: u32, owner: &str) {
        self.recipe.dirs.push(DirSpec {
            path,
            mode,
            owner: owner.to_owned(),
        });
    }

    /// A file without secrets.
    pub fn file(&mut self, path: PathBuf, contents: String, mode: u32, owner: &str) {
        self.recipe.files.push(FileSpec {
            path,
            contents,
            mode,
            owner: owner.to_owned(),
            contains_secret: false,
        });
    }

    /// A file holding a secret: always mode 0600.
    pub fn secret_file(&mut self, path: PathBuf, contents: String, owner: &str) {
        self.recipe.files.push(FileSpec {
            path,
            contents,
            mode: 0o600,
            owner: owner.to_owned(),
            contains_secret: true,
        });
    }

    /// A file holding a secret that a service reads and root writes and reads: root's, mode
    /// 0640, readable by `group`. The service cannot rewrite what root later reads.
    pub fn secret_file_readable_by(&mut self, path: PathBuf, contents: String, group: &str) {
        self.recipe.files.push(FileSpec {
            path,
            contents,
            mode: 0o640,
            owner: format!("root:{group}"),
            contains_secret: true,
        });
    }

    /// Adds a service, and the directory of its log file: root's, which every service user
    /// may traverse (to its own log subdirectory, mode 0700) but not list. The runner creates
    /// each service's output log in it with mode 0600.
    pub fn service(&mut self, service: ServiceSpec) {
        if let Some(dir) = service.log_file.parent()
            && !self.recipe.dirs.iter().any(|d| d.path == dir)
        {
            self.dir(dir.to_path_buf(), 0o711, "root");
        }
        self.recipe.services.push(service);
    }

    /// Adds a step; returns it for the rarer settings (`retry`).
    pub fn step(
        &mut self,
        name: &str,
        phase: Phase,
        command: Command,
        creates: Option<PathBuf>,
    ) -> &mut StepSpec {
        self.recipe.steps.push(StepSpec {
            name: name.to_owned(),
            command,
            phase,
            creates,
            stdin_file: None,
            retry: None,
        });
        let last = self.recipe.steps.len() - 1;
        &mut self.recipe.steps[last]
    }

    /// Steps that copy this server's certificate and key (root's, in the layout's TLS
    /// directory) into `dir` as `server.crt` (0644) and `server.key` (0600), owned by `owner`,
    /// for a service that reads its key as its own user. `dir` is root's, so the service
    /// cannot swap a name in it for a link root would follow. Copied at every apply, so a
    /// renewed certificate is picked up. Steps `<component>-tls-crt`, `<component>-tls-key`.
    pub fn server_tls_copy(&mut self, component: &str, dir: &Path, owner: &str) {
        let l = self.layout();
        for (name, source, mode) in [("crt", l.tls_cert(), "0644"), ("key", l.tls_key(), "0600")] {
            let install = Command::new(s(&l.bins.install))
                .args(["-m", mode, "-o", owner, "-g", owner])
                .args([s(&source), sj(dir, &format!("server.{name}"))]);
            self.step(
                &format!("{component}-tls-{name}"),
                Phase::BeforeStart,
                install,
                None,
            );
        }
    }

    /// Renders template `name` with the server's id and address added to `ctx`.
    pub fn template(&self, name: &str, ctx: Value) -> Result<String, RenderError> {
        let common = minijinja::context! {
            server_id => &self.ctx.server_id,
            address => self.ctx.address.to_string(),
        };
        engine::render(name, minijinja::context! { ..ctx, ..common })
    }
}

/// A service with the defaults most have; callers adjust the rest with struct update syntax.
pub(crate) fn service(
    layout: &Layout,
    name: &str,
    user: &str,
    command: Command,
    readiness: Probe,
) -> ServiceSpec {
    ServiceSpec {
        name: name.to_owned(),
        command,
        user: user.to_owned(),
        env_file: None,
        depends_on: Vec::new(),
        readiness,
        stop_signal: Signal::Term,
        stop_timeout: Duration::from_secs(30),
        reload_signal: None,
        log_file: layout.service_log(name),
    }
}

/// A path as text for a template or an argument; layout paths are validated UTF-8.
pub(crate) fn s(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// `dir/name` as text.
pub(crate) fn sj(dir: &Path, name: &str) -> String {
    s(&dir.join(name))
}
