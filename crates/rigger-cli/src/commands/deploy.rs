//! `rigger deploy`, `rollback`, `releases`, `lock` and `maintenance` (local provider;
//! `releases` reads an AWS environment's history from the AWS provider).

use std::time::Duration;

use rigger_local::control::{self, DeployOptions, DeployTarget};

use super::{report, runtime, say};
use crate::args::{
    DeployArgs, LockCommand, MaintenanceArgs, ReleasesArgs, RollbackArgs, RolloutArgs,
};
use crate::local_env::local_environment;
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
    let outcome = runtime()?.block_on(control::deploy(
        &env,
        target,
        &options,
        &super::report::steps(settings),
    ))?;
    report::finished(
        settings,
        &outcome.release,
        &outcome.result,
        outcome.duration_secs,
        &outcome.reason,
    )
}

pub(crate) fn releases(args: ReleasesArgs, settings: &Settings) -> Result<(), Failure> {
    let history = rigger_local::release::history(&local_environment(settings)?.paths)?;
    report::print_releases(&history, args.json)
}

pub(crate) fn lock(command: LockCommand, settings: &Settings) -> Result<(), Failure> {
    let env = local_environment(settings)?;
    match command {
        LockCommand::Status => {
            let now = rigger_engine::clock::unix_now();
            match rigger_local::deploy::lock_holder(&env.paths) {
                Some(holder)
                    if rigger_local::deploy::live_lock_holder(&env.paths, now).is_none() =>
                {
                    println!(
                        "stale: held by {holder}, whose process is gone or whose time ran out; \
                         the next deploy or database operation takes it over \
                         (`rigger lock release` removes it now)"
                    )
                }
                Some(holder) => println!("held by {holder}"),
                None => println!("free"),
            }
        }
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
    runtime()?
        .block_on(control::maintenance(
            &env,
            mode == "on",
            &report::steps(settings),
        ))
        .map_err(|error| Failure::Operation(anyhow::anyhow!("{error}")))?;
    report::maintenance_done(settings, &mode);
    Ok(())
}
