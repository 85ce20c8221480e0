//! The cache server: Redis, password-protected, listening only on the server's address.

use minijinja::context;

use super::{Builder, s, service};
use crate::error::RenderError;
use crate::{Command, Probe};

pub(super) fn render(b: &mut Builder) -> Result<(), RenderError> {
    let ctx = b.ctx;
    let l = b.layout();
    let user = &l.users.redis;
    let (etc, data) = (l.etc("redis"), l.data("redis"));
    b.dir(etc.clone(), 0o755, "root");
    b.dir(data.clone(), 0o750, user);

    let conf = b.template(
        "redis.conf",
        context! {
            port => ctx.ports.redis,
            data_dir => s(&data),
            password => ctx.secrets.redis_password.expose(),
            maxmemory => &ctx.tuning.redis_maxmemory,
        },
    )?;
    // The whole file is secret: it holds `requirepass`.
    let conf_path = etc.join("redis.conf");
    b.secret_file(conf_path.clone(), conf, user);

    // A TCP probe: redis-cli would need the password in its arguments or environment.
    b.service(service(
        l,
        "redis",
        user,
        Command::new(s(&l.bins.redis_server)).arg(s(&conf_path)),
        Probe::Tcp {
            addr: ctx.address,
            port: ctx.ports.redis,
        },
    ));
    Ok(())
}
