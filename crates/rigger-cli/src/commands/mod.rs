//! One module per command. Each takes its arguments and the global [`Settings`], prints data
//! to stdout, and returns a [`Failure`] for [`crate::run`] to report.

mod aws;
mod db;
mod deploy;
mod image;
mod init;
mod lab;
mod local;
mod plan;
mod remote;
mod report;
mod validate;

use anyhow::Context as _;
use rigger_config::ProviderKind;

use crate::args::Command;
pub(crate) use crate::session::{environment, load_config, runtime, say};
use crate::{Failure, Settings};

pub(crate) fn dispatch(command: Command, settings: &Settings) -> Result<(), Failure> {
    match command {
        // Commands on the configuration, the lab, or this machine's supervisor.
        Command::Init(args) => init::run(args, settings),
        Command::Validate => validate::run(settings),
        Command::Plan(args) => plan::run(args, settings),
        Command::Lab(args) => lab::run(args, settings),
        Command::Supervise => local::supervise(settings),
        Command::Keep => local::keep(settings),
        // Commands on servers: the fleet is found per provider (remote.rs).
        Command::Exec(args) => remote::exec(args, settings),
        Command::Manage(args) => remote::manage(args, settings),
        Command::Logs(args) => remote::logs(args, settings),
        Command::Ssh(args) => remote::ssh(args, settings),
        command => on_environment(command, settings, provider_kind(settings)?),
    }
}

/// The provider of the environment `-e` names. The configuration is loaded (and an invalid
/// one stops the command) once, here.
pub(crate) fn provider_kind(settings: &Settings) -> Result<ProviderKind, Failure> {
    let config = load_config(settings)?;
    Ok(environment(&config, settings)?.provider_kind())
}

/// A command on an environment, sent to its provider's module.
fn on_environment(
    command: Command,
    settings: &Settings,
    provider: ProviderKind,
) -> Result<(), Failure> {
    use ProviderKind::{Aws, Local};
    match (provider, command) {
        (Aws, Command::Up) => aws::up(settings),
        (Aws, Command::Down(args)) => aws::down(args, settings),
        (Aws, Command::Status(args)) => aws::status(args, settings),
        (Aws, Command::Scale(args)) => aws::scale(args, settings),
        (Aws, Command::Deploy(args)) => aws::deploy(args, settings),
        (Aws, Command::Rollback(args)) => aws::rollback(args, settings),
        (Aws, Command::Lock(command)) => aws::lock(command, settings),
        (Aws, Command::Maintenance(args)) => aws::maintenance_command(args, settings),
        (Aws, Command::Releases(args)) => aws::releases(args, settings),
        (Aws, Command::Secrets(command)) => aws::secrets(command, settings),
        (Aws, Command::Db(command)) => aws::db::run(command, settings),
        (Local, Command::Up) => local::up(settings),
        (Local, Command::Down(args)) => local::down(args, settings),
        (Local, Command::Status(args)) => local::status(args, settings),
        (Local, Command::Scale(args)) => local::scale(args, settings),
        (Local, Command::Deploy(args)) => deploy::deploy(args, settings),
        (Local, Command::Rollback(args)) => deploy::rollback(args, settings),
        (Local, Command::Lock(command)) => deploy::lock(command, settings),
        (Local, Command::Maintenance(args)) => deploy::maintenance(args, settings),
        (Local, Command::Db(command)) => db::run(command, settings),
        (Local, Command::Releases(args)) => deploy::releases(args, settings),
        (Local, Command::Secrets(command)) => local::secrets(command, settings),
        (provider, Command::Image(command)) => image::run(command, settings, provider),
        (
            _,
            command @ (Command::Init(_)
            | Command::Validate
            | Command::Plan(_)
            | Command::Lab(_)
            | Command::Supervise
            | Command::Keep
            | Command::Exec(_)
            | Command::Manage(_)
            | Command::Logs(_)
            | Command::Ssh(_)),
        ) => dispatch(command, settings),
    }
}

/// `rigger scale`'s `GROUP=COUNT` pairs.
pub(crate) fn scale_counts(counts: &[String]) -> Result<Vec<(String, u32)>, Failure> {
    counts
        .iter()
        .map(|assignment| {
            assignment
                .split_once('=')
                .and_then(|(g, c)| Some((g.to_owned(), c.parse::<u32>().ok()?)))
                .ok_or_else(|| {
                    Failure::Usage(anyhow::anyhow!(
                        "`{assignment}` is not GROUP=COUNT (e.g. web=3)"
                    ))
                })
        })
        .collect()
}

/// Asks the user to type `expected` to confirm something destructive. Without a terminal it
/// refuses with `without_terminal` (which says which flag skips the question).
pub(crate) fn confirm(
    question: &str,
    expected: &str,
    without_terminal: &str,
) -> Result<(), Failure> {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(Failure::Usage(anyhow::anyhow!("{without_terminal}")));
    }
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    stdin
        .lock()
        .read_line(&mut answer)
        .context("reading the confirmation")?;
    if answer.trim() != expected {
        return Err(Failure::Usage(anyhow::anyhow!(
            "not confirmed; nothing was changed"
        )));
    }
    Ok(())
}

/// `rigger status` for people: the same `rigger.status` document whatever the provider.
pub(crate) fn render_status(status: &rigger_plan::status::Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}/{}  provider {}  release {}  {:?}: {}",
        status.project,
        status.environment,
        status.provider,
        status.release,
        status.phase,
        status.message
    );
    if status.maintenance {
        let _ = writeln!(
            out,
            "  maintenance mode is on: web servers answer 503 (`rigger maintenance off` ends it)"
        );
    }
    for url in &status.urls {
        let _ = writeln!(out, "  {url}");
    }
    if let Some(restarts) = status.supervisor_restarts.as_ref().filter(|r| r.count > 0) {
        let _ = writeln!(
            out,
            "  the supervisor was restarted {} time{} by its keeper (last: {}, {})",
            restarts.count,
            if restarts.count == 1 { "" } else { "s" },
            restarts.last_why.as_deref().unwrap_or("unknown"),
            restarts.last_at.map_or_else(
                || "at an unknown time".to_owned(),
                |at| {
                    let ago = rigger_engine::clock::unix_now().saturating_sub(at);
                    format!("{ago} s ago")
                }
            )
        );
    }
    for group in &status.groups {
        let _ = writeln!(
            out,
            "group {:<7} min {} desired {} max {}",
            group.name, group.min, group.desired, group.max
        );
    }
    if !status.servers.is_empty() {
        let _ = writeln!(
            out,
            "{:<13} {:<16} {:<15} {:<16} {:<10} processes",
            "SERVER", "ROLES", "ADDRESS", "STATE", "LB"
        );
    }
    for server in &status.servers {
        // Processes are known only where rigger runs them (empty on AWS).
        let processes: Vec<String> = server
            .processes
            .iter()
            .map(|p| {
                format!(
                    "{}:{}",
                    p.name,
                    if p.state == "running" { "up" } else { "DOWN" }
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "{:<13} {:<16} {:<15} {:<16} {:<10} {}",
            server.id,
            server.roles.join(","),
            server.address,
            server.state,
            server.load_balancer.as_deref().unwrap_or("-"),
            processes.join(" ")
        );
    }
    for replica in &status.replication {
        let _ = writeln!(
            out,
            "replica {:<12} {:<10} lag {} bytes, {:.3} s",
            replica.id,
            replica.state,
            replica.lag_bytes.map_or("?".into(), |b| b.to_string()),
            replica.lag_seconds.unwrap_or(f64::NAN)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use rigger_plan::status::{Phase, ProcessStatus, ReplicaStatus, ServerStatus, Status};

    #[test]
    fn status_renders_servers_processes_and_replication() {
        let status = Status {
            schema: "rigger.status".into(),
            version: 1,
            project: "surveys".into(),
            environment: "local".into(),
            provider: "local".into(),
            phase: Phase::Ready,
            message: "every server is running".into(),
            release: "initial".into(),
            urls: vec!["https://127.77.0.1:8443/".into()],
            supervisor_pid: Some(1),
            supervisor_restarts: None,
            maintenance: false,
            groups: Vec::new(),
            servers: vec![ServerStatus {
                id: "web-1".into(),
                roles: vec!["web".into()],
                address: "127.77.1.1".into(),
                release: "initial".into(),
                state: "in_service".into(),
                processes: vec![
                    ProcessStatus {
                        name: "nginx".into(),
                        pid: Some(2),
                        state: "running".into(),
                    },
                    ProcessStatus {
                        name: "gunicorn".into(),
                        pid: None,
                        state: "stopped".into(),
                    },
                ],
                load_balancer: Some("UP".into()),
            }],
            replication: vec![ReplicaStatus {
                id: "db-replica1".into(),
                state: "streaming".into(),
                lag_bytes: Some(0),
                lag_seconds: Some(0.0),
            }],
            updated: 0,
        };
        insta::assert_snapshot!(super::render_status(&status), @r"
        surveys/local  provider local  release initial  Ready: every server is running
          https://127.77.0.1:8443/
        SERVER        ROLES            ADDRESS         STATE            LB         processes
        web-1         web              127.77.1.1      in_service       UP         nginx:up gunicorn:DOWN
        replica db-replica1  streaming  lag 0 bytes, 0.000 s
        ");
    }
}
