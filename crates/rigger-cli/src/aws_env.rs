//! Opening an AWS environment for a command: the connection (the region from rigger.toml,
//! `--endpoint-url`, the SDK's standard chain for the rest), the credentials check, the
//! provider, and what the other commands ask of it before they start (its servers, whether
//! they are machines). Every AWS command module opens its environment here, so none of them
//! needs another's.

use anyhow::anyhow;
use rigger_aws::deploy::Requester;
use rigger_aws::{Connection, Provider};
use rigger_config::Config;
use rigger_plan::Observed;
use rigger_topology::Topology;

use crate::session::{runtime, say};
use crate::{Failure, Settings};

fn connection(settings: &Settings) -> Connection {
    Connection {
        // Replaced by the environment's `region`.
        region: String::new(),
        endpoint_url: settings.endpoint_url.clone(),
        max_attempts: None,
        static_credentials: None,
    }
}

fn no_credentials() -> Failure {
    Failure::Operation(anyhow!(
        "no AWS credentials are configured\n  help: {}",
        rigger_aws::ErrorKind::Credentials.hint()
    ))
}

pub(crate) async fn provider(config: Config, settings: &Settings) -> Result<Provider, Failure> {
    Provider::connect(config, &settings.environment, &connection(settings))
        .await
        .ok_or_else(|| {
            Failure::Usage(anyhow!(
                "`{}` is not an AWS environment",
                settings.environment
            ))
        })
}

/// Stops a command that would call AWS itself (no endpoint override) before it does anything
/// when no credentials are configured, saying how to configure them.
pub(crate) fn require_credentials(settings: &Settings) -> Result<(), Failure> {
    if settings.endpoint_url.is_none() && !rigger_aws::client::credentials_configured() {
        return Err(no_credentials());
    }
    Ok(())
}

pub(crate) fn failed(error: rigger_aws::AwsError) -> Failure {
    Failure::Operation(anyhow::Error::new(error))
}

/// The environment's running servers and their addresses, for `rigger exec`, `logs`,
/// `manage` and `ssh`.
pub(crate) fn servers(
    config: &Config,
    settings: &Settings,
) -> Result<Vec<rigger_aws::LiveServer>, Failure> {
    require_credentials(settings)?;
    runtime()?.block_on(async {
        let provider = provider(config.clone(), settings).await?;
        provider.servers().await.map_err(failed)
    })
}

/// Why nothing is done on the servers themselves against an emulator alone.
pub(crate) const EMULATED: &str = "every AWS call goes to an endpoint override (an emulator) and no server has published its SSH host keys: the instances are the emulator's rows, not machines (`rigger lab` makes them machines)";

/// Whether the SSH steps run: on AWS always; against an endpoint override only when the
/// servers are machines (the lab), as [`Provider::servers_are_machines`] decides.
pub(crate) async fn servers_are_machines(provider: &Provider) -> Result<bool, Failure> {
    provider.servers_are_machines().await.map_err(failed)
}

/// The live state of the environment and the topology to compare it with, for `rigger plan`:
/// existing groups keep the counts scaling gave them (`Provider::desired`). Without any
/// configured credentials (and no --endpoint-url) nothing can be observed: the plan is then
/// the one against an empty world, with a warning, as before the first `up`.
pub(crate) fn observe(
    config: &Config,
    settings: &Settings,
    release: &str,
) -> Result<(Observed, Topology), Failure> {
    if settings.endpoint_url.is_none()
        && std::env::var_os("AWS_ENDPOINT_URL").is_none()
        && !rigger_aws::client::credentials_configured()
    {
        say(
            settings,
            "warning: no AWS credentials are configured, so nothing was observed: this is the plan against an empty environment",
        );
        let topology = rigger_topology::desired(config, &settings.environment, release)
            .map_err(|error| Failure::Usage(error.into()))?;
        return Ok((Observed::empty(), topology));
    }
    runtime()?.block_on(async {
        let provider = provider(config.clone(), settings).await?;
        let (_, live) = provider.observe().await.map_err(failed)?;
        let release = provider
            .current_release(&live)
            .unwrap_or_else(|| release.to_owned());
        let topology = provider
            .desired(&live, &release)
            .map_err(|error| Failure::Usage(error.into()))?;
        // The AMI launch templates and new servers use (a baked one, or rigger.toml's).
        say(
            settings,
            &provider.image(&live).describe(&settings.environment),
        );
        Ok((live.observed(&provider.env), topology))
    })
}

/// Who is deploying: this user, host and process (a lock left by a process of this host that
/// ended is taken over at once).
pub(crate) fn requester() -> Requester {
    Requester {
        who: rigger_local::release::who(),
        pid: i32::try_from(std::process::id()).unwrap_or(0),
        process_alive: rigger_local::process::is_running,
    }
}
