//! `rigger db`: replication status, failover, reseed, backup and restore (local provider;
//! AWS environments go to `aws_db`).

use anyhow::{Context as _, anyhow};
use rigger_local::control;

use super::confirm;
use super::{report, runtime, say};
use crate::args::DbCommand;
use crate::local_env::local_environment;
use crate::{Failure, Settings};

/// `rigger db` on a local environment (AWS ones: `aws_db.rs`).
pub(crate) fn run(command: DbCommand, settings: &Settings) -> Result<(), Failure> {
    let env = local_environment(settings)?;
    let runtime = runtime()?;
    match command {
        DbCommand::Status { json } => {
            let status = runtime.block_on(control::db_status(&env))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).context("encoding")?
                );
                return Ok(());
            }
            println!("primary  {}", status.primary.as_deref().unwrap_or("(none)"));
            report::print_replication(&status, "replica");
        }
        DbCommand::Promote { replica, force } => {
            let outcome = runtime.block_on(control::db_operation(
                &env,
                "promote",
                replica,
                force,
                &super::report::steps(settings),
            ))?;
            if !outcome.succeeded {
                return Err(Failure::Operation(anyhow!(
                    "failover failed: {}",
                    outcome.message
                )));
            }
            let paused = outcome
                .writes_paused_secs
                .map_or(String::new(), |s| format!(" (writes held for {s:.2} s)"));
            say(settings, &format!("{}{paused}", outcome.message));
        }
        DbCommand::Reseed { replica } => {
            let outcome = runtime.block_on(control::db_operation(
                &env,
                "reseed",
                replica,
                false,
                &super::report::steps(settings),
            ))?;
            if !outcome.succeeded {
                return Err(Failure::Operation(anyhow!(
                    "reseed failed: {}",
                    outcome.message
                )));
            }
            say(settings, &outcome.message);
        }
        DbCommand::Backup { keep } => {
            let path = runtime.block_on(control::db_backup(&env, keep))?;
            say(
                settings,
                &format!("backup written (mode 0600); keeping the newest {keep}"),
            );
            println!("{}", path.display());
        }
        DbCommand::History { json } => {
            let history = rigger_local::supervisor::database::history(&env.paths)?;
            report::print_operations(&history, json)?;
        }
        DbCommand::Backups => {
            for name in control::list_backups(&env) {
                println!("{name}");
            }
        }
        DbCommand::Restore { backup, yes } => {
            if !yes {
                confirm(
                    &format!(
                        "This replaces the database of {}/{} with {backup}. Type the environment's name to confirm: ",
                        env.config.project.name, env.name
                    ),
                    &env.name,
                    "refusing to restore without confirmation; pass --yes",
                )?;
            }
            runtime.block_on(control::db_restore(&env, &backup))?;
            say(settings, &format!("restored {backup}"));
        }
    }
    Ok(())
}
