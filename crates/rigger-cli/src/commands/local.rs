//! Commands that act on a running environment: `up`, `down`, `status`, `scale`, `secrets`,
//! and the hidden `supervise` (the AWS provider's `up`, `down`, `status` and `scale` are in
//! `aws.rs`; `secrets list` reads either provider's).

use anyhow::Context as _;
use rigger_local::control::{self, UpOutcome};

use super::{report, runtime, say};
use crate::args::{DownArgs, ScaleArgs, SecretsCommand, StatusArgs};
use crate::local_env::{local_environment, scaled_local_environment};
use crate::{Failure, Settings};

pub(crate) fn up(settings: &Settings) -> Result<(), Failure> {
    let env = scaled_local_environment(settings)?;
    let rigger = std::env::current_exe().context("finding the rigger executable")?;
    let started = std::time::Instant::now();
    let outcome = runtime()?.block_on(control::up(
        &env,
        &rigger,
        &settings.config_path,
        &report::steps(settings),
    ))?;
    let (status, verb) = match &outcome {
        UpOutcome::Started(status) => (status, "is up"),
        UpOutcome::Updated(status) => (status, "was updated"),
        UpOutcome::AlreadyUp(status) => (status, "was already up and healthy: nothing to do"),
    };
    let elapsed = started.elapsed().as_secs_f64();
    say(
        settings,
        &format!(
            "{}/{} {verb} ({elapsed:.1} s)",
            status.project, status.environment
        ),
    );
    println!("{}", status.urls.first().map_or("", String::as_str));
    Ok(())
}

pub(crate) fn down(args: DownArgs, settings: &Settings) -> Result<(), Failure> {
    let DownArgs { purge, yes } = args;
    let env = local_environment(settings)?;
    if purge && !yes {
        super::confirm(
            &format!(
                "This deletes {}: the databases, logs and secrets of {}/{}. Type the environment's name to confirm: ",
                env.paths.root().display(),
                env.config.project.name,
                env.name
            ),
            &env.name,
            "refusing to purge without confirmation; pass --yes",
        )?;
    }
    runtime()?.block_on(control::down(&env, purge, &report::steps(settings)))?;
    say(
        settings,
        &format!("{}/{} is down", env.config.project.name, env.name),
    );
    Ok(())
}

pub(crate) fn status(args: StatusArgs, settings: &Settings) -> Result<(), Failure> {
    let StatusArgs { json } = args;
    let env = local_environment(settings)?;
    let status = runtime()?.block_on(control::status(&env));
    if json {
        let value = match &status {
            Some(status) => serde_json::to_value(status).context("encoding the status")?,
            None => serde_json::json!({
                "schema": "rigger.status", "version": 1, "project": env.config.project.name,
                "environment": env.name, "provider": "local", "phase": "down", "servers": [],
                "orphaned_processes": rigger_local::process::live_records(&env.paths.servers())
                    .iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
            }),
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&value).context("encoding the status")?
        );
        return Ok(());
    }
    match status {
        Some(status) => print!("{}", super::render_status(&status)),
        None => {
            let orphans = rigger_local::process::live_records(&env.paths.servers());
            if orphans.is_empty() {
                println!(
                    "{}/{} is down (run `rigger up`)",
                    env.config.project.name, env.name
                );
            } else {
                let names: Vec<&str> = orphans.iter().map(|r| r.name.as_str()).collect();
                println!(
                    "{}/{}: no supervisor is running, but {} of its processes are ({}); \
                     `rigger up` takes over (adopting those that are unchanged), `rigger down` stops them",
                    env.config.project.name,
                    env.name,
                    orphans.len(),
                    names.join(", ")
                );
            }
        }
    }
    Ok(())
}

pub(crate) fn scale(args: ScaleArgs, settings: &Settings) -> Result<(), Failure> {
    let ScaleArgs { counts } = args;
    let env = local_environment(settings)?;
    let counts = super::scale_counts(&counts)?;
    report::scaled(runtime()?.block_on(control::scale(&env, &counts, &report::steps(settings))))
}

pub(crate) fn secrets(command: SecretsCommand, settings: &Settings) -> Result<(), Failure> {
    let SecretsCommand::List { json } = command;
    let names = rigger_local::secrets::names(&local_environment(settings)?.paths.secrets());
    report::print_secret_names(&names, json, settings)
}

pub(crate) fn keep(settings: &Settings) -> Result<(), Failure> {
    let env = local_environment(settings)?;
    let rigger = std::env::current_exe().context("finding the rigger executable")?;
    let config_path = std::fs::canonicalize(&settings.config_path)
        .unwrap_or_else(|_| settings.config_path.clone());
    let supervisor = || {
        tokio::process::Command::from(control::rigger_command(
            &rigger,
            &config_path,
            &env.name,
            "supervise",
        ))
    };
    match runtime()?.block_on(rigger_local::keeper::keep(&env, supervisor))? {
        0 => Ok(()),
        code => Err(Failure::Operation(anyhow::anyhow!(
            "the supervisor ended with exit code {code} (see its status and log)"
        ))),
    }
}

pub(crate) fn supervise(settings: &Settings) -> Result<(), Failure> {
    let env = local_environment(settings)?;
    runtime()?
        .block_on(rigger_local::supervisor::run(env))
        .map_err(Failure::Operation)
}
