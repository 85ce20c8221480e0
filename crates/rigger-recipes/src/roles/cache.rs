//! The cache server: Redis, password-protected, over TLS only, listening only on the server's
//! address.
//!
//! Redis serves its TLS port alone (`port 0`: nothing in clear), with the server's certificate
//! (signed by the environment CA, for its id and address), so the app's `rediss://`
//! connections check whom they talk to and nobody on the network reads the password, the
//! sessions or the cache. Clients present no certificate (`tls-auth-clients no`): the password
//! authenticates them.

use minijinja::context;

use super::{Builder, s, service, sj};
use crate::error::RenderError;
use crate::{Command, Probe};

pub(super) fn render(b: &mut Builder) -> Result<(), RenderError> {
    let ctx = b.ctx;
    let l = b.layout();
    let user = &l.users.redis;
    let (etc, data) = (l.etc("redis"), l.data("redis"));
    // Root's: root copies the key into it (see `server_tls_copy`).
    b.dir(etc.clone(), 0o755, "root");
    b.dir(data.clone(), 0o750, user);
    b.server_tls_copy("redis", &etc, user);

    let conf = b.template(
        "redis.conf",
        context! {
            tls_port => ctx.ports.redis_tls,
            tls_cert_file => sj(&etc, "server.crt"),
            tls_key_file => sj(&etc, "server.key"),
            ca_file => s(&l.ca_cert()),
            data_dir => s(&data),
            password => ctx.secrets.redis_password.expose(),
            maxmemory => &ctx.tuning.redis_maxmemory,
        },
    )?;
    // The whole file is secret: it holds `requirepass`.
    let conf_path = etc.join("redis.conf");
    b.secret_file(conf_path.clone(), conf, user);

    // A TLS handshake checked against the CA; redis-cli would need the password in its
    // arguments or environment.
    b.service(service(
        l,
        "redis",
        user,
        Command::new(s(&l.bins.redis_server)).arg(s(&conf_path)),
        Probe::Tls {
            addr: ctx.address,
            port: ctx.ports.redis_tls,
            server_name: ctx.server_id.clone(),
            ca_file: l.ca_cert(),
        },
    ));
    Ok(())
}
