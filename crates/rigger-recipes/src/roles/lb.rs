//! The local provider's load balancer: HAProxy in master-worker mode, TLS on the https port
//! with this server's certificate, each web server's nginx behind it over TLS checked against
//! the environment CA. The http port forwards to the web servers' port 80, as the seed's
//! load balancer did, and nginx redirects to https. A stats socket in the run directory lets
//! the provider read each web server's UP/DOWN state.

use std::time::Duration;

use minijinja::context;
use minijinja::value::{Serde, Value};

use super::{Builder, s, service, sj};
use crate::error::RenderError;
use crate::{Command, Probe, ServiceSpec, Signal};

pub(super) fn render(b: &mut Builder) -> Result<(), RenderError> {
    let ctx = b.ctx;
    let l = b.layout();
    let (etc, run) = (l.etc("haproxy"), l.run("haproxy"));
    b.dir(etc.clone(), 0o755, "root");
    b.dir(run.clone(), 0o755, "root");

    let p = &ctx.project;
    let ports = &ctx.ports;
    let cfg = b.template(
        "haproxy.cfg",
        context! {
            haproxy_user => &l.users.haproxy,
            stats_socket => sj(&run, "haproxy.sock"),
            server_timeout => ctx.tuning.gunicorn_timeout + 10,
            lb_http => ports.lb_http,
            lb_https => ports.lb_https,
            nginx_http => ports.nginx_http,
            nginx_https => ports.nginx_https,
            tls_cert => s(&l.tls_cert()),
            ca_file => s(&l.ca_cert()),
            health_path => &p.health_check_path,
            canonical_domain => p.canonical_domain(),
            web_backends => Value::from(Serde(&ctx.peers.web_backends)),
        },
    )?;
    let cfg_path = etc.join("haproxy.cfg");
    b.file(cfg_path.clone(), cfg, 0o644, "root");

    let haproxy = Command::new(s(&l.bins.haproxy)).args(["-W", "-db", "-f", &s(&cfg_path)]);
    b.service(ServiceSpec {
        // SIGUSR1: soft stop, established connections finish (hard-stop-after 25s).
        stop_signal: Signal::Usr1,
        stop_timeout: Duration::from_secs(30),
        reload_signal: Some(Signal::Usr2),
        ..service(
            l,
            "haproxy",
            "root",
            haproxy,
            Probe::Tcp {
                addr: ctx.address,
                port: ports.lb_https,
            },
        )
    });
    Ok(())
}
