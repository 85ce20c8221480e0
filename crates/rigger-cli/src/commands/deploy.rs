//! `rigger deploy`, `rollback`, `releases`, `lock` and `maintenance` (local provider;
//! `releases` reads an AWS environment's history from the AWS provider).

use std::time::Duration;

use anyhow::{Context as _, anyhow};
use rigger_config::ProviderKind;
use rigger_local::control::{self, DeployOptions, DeployTarget};

use super::local::local_environment;
use super::{runtime, say};
use crate::args::{
    DeployArgs, LockCommand, MaintenanceArgs, ReleasesArgs, RollbackArgs, RolloutArgs,
};
use crate::{Failure, Settings};

fn options(args: RolloutArgs) -> DeployOptions {
    let RolloutArgs {
        batch,
        health_timeout,
        worker_stop_timeout,
        drain_timeout,
    } = args;
    DeployOptions {
        batch,
        health_timeout: Duration::from_secs(health_timeout),
        worker_stop_timeout: Duration::from_secs(worker_stop_timeout),
        drain_timeout: Duration::from_secs(drain_timeout),
    }
}

pub(crate) fn deploy(args: DeployArgs, settings: &Settings) -> Result<(), Failure> {
    let DeployArgs {
        revision,
        allow_dirty,
        rollout,
    } = args;
    roll_out(
        DeployTarget::Build {
            revision,
            allow_dirty,
        },
        options(rollout),
        settings,
    )
}

pub(crate) fn rollback(args: RollbackArgs, settings: &Settings) -> Result<(), Failure> {
    let RollbackArgs { to, rollout } = args;
    let target = to.map_or(DeployTarget::Previous, DeployTarget::Existing);
    roll_out(target, options(rollout), settings)
}

fn roll_out(
    target: DeployTarget,
    options: DeployOptions,
    settings: &Settings,
) -> Result<(), Failure> {
    let env = local_environment(settings)?;
    let outcome = runtime()?.block_on(control::deploy(&env, target, &options, |line| {
        say(settings, &format!("  {line}"));
    }))?;
    finished(
        settings,
        &outcome.release,
        &outcome.result,
        outcome.duration_secs,
        &outcome.reason,
    )
}

/// How a deploy or rollback ended, said the same way for both providers: the release on
/// stdout when it succeeded, otherwise an error with the reason.
pub(crate) fn finished(
    settings: &Settings,
    release: &str,
    result: &str,
    seconds: f64,
    reason: &str,
) -> Result<(), Failure> {
    let summary = format!("release {release} {result} in {seconds:.1} s");
    if result == "succeeded" {
        say(settings, &summary);
        println!("{release}");
        Ok(())
    } else {
        Err(Failure::Operation(anyhow!("{summary}: {reason}")))
    }
}

pub(crate) fn releases(
    args: ReleasesArgs,
    settings: &Settings,
    provider: ProviderKind,
) -> Result<(), Failure> {
    let ReleasesArgs { json } = args;
    let history = match provider {
        ProviderKind::Aws => super::aws::history(settings)?,
        ProviderKind::Local => rigger_local::release::history(&local_environment(settings)?.paths),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&history).context("encoding the history")?
        );
        return Ok(());
    }
    println!(
        "{:<32} {:<14} {:<24} {:<18} {:<12} {:>9}",
        "RELEASE", "REVISION", "BY", "STARTED (UTC)", "RESULT", "DURATION"
    );
    for record in history {
        println!(
            "{:<32} {:<14} {:<24} {:<18} {:<12} {:>8}s",
            record.release,
            record.revision.chars().take(12).collect::<String>(),
            record.by,
            rigger_plan::deploys::utc_timestamp(record.started),
            record.result,
            record.finished.saturating_sub(record.started)
        );
    }
    Ok(())
}

pub(crate) fn lock(command: LockCommand, settings: &Settings) -> Result<(), Failure> {
    let env = local_environment(settings)?;
    match command {
        LockCommand::Status => match rigger_local::deploy::lock_holder(&env.paths) {
            Some(holder) => println!("held by {holder}"),
            None => println!("free"),
        },
        LockCommand::Release { id } => {
            match rigger_local::deploy::release(
                &env.paths,
                id.as_deref(),
                rigger_engine::clock::unix_now(),
            )? {
                Some(holder) => say(settings, &format!("released the lock held by {holder}")),
                None => say(settings, "the lock was free"),
            }
        }
    }
    Ok(())
}

pub(crate) fn maintenance(args: MaintenanceArgs, settings: &Settings) -> Result<(), Failure> {
    let MaintenanceArgs { mode } = args;
    let env = local_environment(settings)?;
    control::maintenance(&env, mode == "on")?;
    maintenance_done(settings, &mode);
    Ok(())
}

/// `rigger maintenance` on AWS (`commands/aws.rs`), said as locally.
pub(crate) fn maintenance_aws(args: MaintenanceArgs, settings: &Settings) -> Result<(), Failure> {
    let MaintenanceArgs { mode } = args;
    super::aws::maintenance(settings, mode == "on")?;
    maintenance_done(settings, &mode);
    Ok(())
}

fn maintenance_done(settings: &Settings, mode: &str) {
    say(
        settings,
        &format!(
            "maintenance {mode}: every web server {}",
            if mode == "on" {
                "answers 503 with the maintenance page (health checks stay green)"
            } else {
                "serves the site again"
            }
        ),
    );
}
