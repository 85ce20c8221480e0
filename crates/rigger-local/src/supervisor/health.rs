//! A web server's own health check, asked directly (not through the load balancer): a new
//! server joins the load balancer only once it answers 200, because HAProxy counts a newly
//! added server UP until its checks fail, and a broken release would serve errors meanwhile.

use std::time::{Duration, Instant};

use anyhow::bail;

use super::RunningService;
use crate::environment::LocalEnvironment;
use crate::process;
use crate::registry::ServerRecord;

/// Asks `server`'s nginx for the health path (as the load balancer would: HTTPS, the canonical
/// host) until it answers 200, a service dies, or `timeout` passes; the error quotes the last
/// answer and the app's log.
pub(super) async fn wait_healthy_directly(
    env: &LocalEnvironment,
    server: &ServerRecord,
    timeout: Duration,
    services: &[RunningService],
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let last = match probe(env, server).await {
            Ok((200, _)) => return Ok(()),
            Ok((code, body)) => format!("answered {code}: {body:?}"),
            Err(error) => error,
        };
        if let Some(dead) = services.iter().find(|s| !s.record.is_alive()) {
            bail!(
                "{}: {} exited while its health check {last}{}",
                server.id,
                dead.spec.name,
                log_tail(services)
            );
        }
        if started.elapsed() > timeout {
            bail!(
                "{}: not healthy after {} s: GET {} {last}{}",
                server.id,
                timeout.as_secs(),
                env.config.project.health_check_path,
                log_tail(services)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One GET of the health path: the status and the start of the body.
pub(super) async fn probe(
    env: &LocalEnvironment,
    server: &ServerRecord,
) -> Result<(u16, String), String> {
    let project = &env.config.project;
    let host = project
        .domains
        .first()
        .map_or("localhost", |d| d.trim_start_matches('.'));
    let output = tokio::process::Command::new("curl")
        .args([
            "-sk",
            "--noproxy",
            "*",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code}",
        ])
        .arg("--resolve")
        .arg(format!("{host}:443:{}", server.address))
        .arg(format!("https://{host}{}", project.health_check_path))
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|error| format!("could not run curl: {error}"))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
    let code: u16 = code.trim().parse().unwrap_or(0);
    if code == 0 {
        return Err("did not answer (connection failed)".into());
    }
    Ok((code, body.trim().chars().take(300).collect()))
}

fn log_tail(services: &[RunningService]) -> String {
    let Some(app) = services.iter().find(|s| s.spec.name == "gunicorn") else {
        return String::new();
    };
    let lines = process::log_tail(&app.spec.log_file, 15);
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "\n  last lines of {}:\n    {}",
        app.spec.log_file.display(),
        lines.join("\n    ")
    )
}
