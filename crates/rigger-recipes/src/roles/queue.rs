//! The queue server: RabbitMQ (and, when asked, the epmd it registers with).
//!
//! AMQP is served over TLS only (AMQPS, `listeners.tcp = none`), with the server's certificate
//! signed by the environment CA, so the app's `amqps://` connections check whom they talk to
//! and nobody on the network reads the password or the tasks. Clients present no certificate:
//! the password authenticates them. Erlang distribution (rabbitmqctl, on the server itself)
//! stays as it is.
//!
//! The node is configured through `RABBITMQ_*` variables (none secret) that point every file
//! and directory into the layout, so several nodes can share a machine and the system's
//! `/etc/rabbitmq` is never read. The Erlang cookie is created by the node itself in its
//! `HOME` at first boot: rigger never sees it.

use std::net::Ipv4Addr;
use std::time::Duration;

use minijinja::context;

use super::{Builder, s, service, sj};
use crate::error::RenderError;
use crate::{Command, Probe, ServiceSpec};

pub(super) fn render(b: &mut Builder) -> Result<(), RenderError> {
    let ctx = b.ctx;
    let l = b.layout();
    let user = &l.users.rabbitmq;
    let (etc, data, log, run, home) = (
        l.etc("rabbitmq"),
        l.data("rabbitmq"),
        l.log("rabbitmq"),
        l.run("rabbitmq"),
        l.home(user),
    );
    // Root's: root copies the key into it (see `server_tls_copy`).
    b.dir(etc.clone(), 0o755, "root");
    b.dir(data.clone(), 0o750, user);
    b.dir(log.clone(), 0o700, user);
    b.dir(run.clone(), 0o755, user);
    b.dir(home.clone(), 0o700, user);
    b.server_tls_copy("rabbitmq", &etc, user);

    let p = &ctx.project;
    let conf = b.template(
        "rabbitmq.conf",
        context! {
            user => &p.amqp_user,
            password => ctx.secrets.rabbitmq_password.expose(),
            vhost => &p.amqp_vhost,
            memory_limit => &ctx.tuning.rabbitmq_memory_limit,
            amqps_port => ctx.ports.amqps,
            ca_file => s(&l.ca_cert()),
            cert_file => sj(&etc, "server.crt"),
            key_file => sj(&etc, "server.key"),
        },
    )?;
    b.secret_file(etc.join("rabbitmq.conf"), conf, user);
    b.file(etc.join("enabled_plugins"), "[].\n".into(), 0o644, user);
    b.file(etc.join("advanced.config"), "[].\n".into(), 0o644, user);
    b.file(
        etc.join("rabbitmq-env.conf"),
        "# Empty on purpose: rigger sets RABBITMQ_* in the environment.\n".into(),
        0o644,
        user,
    );

    let node = format!("rabbit@{}", ctx.address);
    let epmd_addresses = if ctx.address == Ipv4Addr::LOCALHOST {
        "127.0.0.1".to_owned()
    } else {
        format!("127.0.0.1,{}", ctx.address)
    };
    let octets = ctx.address.octets().map(|o| o.to_string()).join(",");
    let env = |c: Command| {
        c.env("HOME", s(&home))
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_USE_LONGNAME", "true")
            .env("RABBITMQ_DIST_PORT", ctx.ports.rabbit_dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", sj(&data, "mnesia"))
            .env("RABBITMQ_LOG_BASE", s(&log))
            .env("RABBITMQ_PID_FILE", sj(&run, "rabbitmq.pid"))
            .env("RABBITMQ_CONFIG_FILE", sj(&etc, "rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", sj(&etc, "enabled_plugins"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", sj(&etc, "advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", sj(&etc, "rabbitmq-env.conf"))
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                format!("-kernel inet_dist_use_interface {{{octets}}}"),
            )
            .env("ERL_EPMD_ADDRESS", &epmd_addresses)
            .env("ERL_EPMD_PORT", ctx.ports.epmd.to_string())
    };

    let bin = &l.bins.rabbitmq_bin_dir;
    let server = env(Command::new(sj(bin, "rabbitmq-server")));
    let await_startup = env(Command::new(sj(bin, "rabbitmqctl")))
        .args(["-n", &node, "await_startup"])
        .user(user);
    let mut depends_on = Vec::new();
    if ctx.start_epmd {
        let epmd = Command::new(s(&l.bins.epmd))
            .args(["-address", &epmd_addresses])
            .args(["-port", &ctx.ports.epmd.to_string()]);
        b.service(ServiceSpec {
            stop_timeout: Duration::from_secs(10),
            ..service(
                l,
                "epmd",
                user,
                epmd,
                Probe::Tcp {
                    addr: ctx.address,
                    port: ctx.ports.epmd,
                },
            )
        });
        depends_on.push("epmd".to_owned());
    }
    b.service(ServiceSpec {
        depends_on,
        stop_timeout: Duration::from_secs(60),
        ..service(l, "rabbitmq", user, server, Probe::Command(await_startup))
    });
    Ok(())
}
