//! `plan`, `up`, `down` and `status` for environments with `provider = "aws"`: a thin layer
//! over `rigger_aws::Provider` that resolves the connection (region from rigger.toml,
//! `--endpoint-url`, the SDK's standard chain for the rest), runs it on a tokio runtime and
//! prints like the local provider does.

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use anyhow::{Context as _, anyhow};
use rigger_aws::{Connection, Provider};
use rigger_config::{Config, ProviderKind};
use rigger_plan::Observed;
use rigger_topology::Topology;

use crate::args::{DownArgs, StatusArgs};
use crate::{Failure, Settings};

/// Whether `-e` names an AWS environment (loading the configuration, which stops the
/// command on an invalid file).
pub(crate) fn is_aws(settings: &Settings) -> Result<bool, Failure> {
    let config = super::load_config(settings)?;
    Ok(super::environment(&config, settings)?.provider_kind() == ProviderKind::Aws)
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .map_err(Failure::Operation)
}

fn say(settings: &Settings, line: &str) {
    if settings.verbosity >= 0 {
        eprintln!("{line}");
    }
}

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

async fn provider(config: Config, settings: &Settings) -> Result<Provider, Failure> {
    Provider::connect(config, &settings.environment, &connection(settings))
        .await
        .ok_or_else(|| {
            Failure::Usage(anyhow!(
                "`{}` is not an AWS environment",
                settings.environment
            ))
        })
}

fn failed(error: rigger_aws::AwsError) -> Failure {
    Failure::Operation(anyhow::Error::new(error))
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
        let topology = provider
            .desired(&live, release)
            .map_err(|error| Failure::Usage(error.into()))?;
        Ok((live.observed(&provider.env), topology))
    })
}

pub(crate) fn up(settings: &Settings) -> Result<(), Failure> {
    let config = super::load_config(settings)?;
    // An unknown environment stops here, before anything is asked of AWS.
    super::environment(&config, settings)?;
    if settings.endpoint_url.is_none() && !rigger_aws::client::credentials_configured() {
        return Err(no_credentials());
    }
    let started = std::time::Instant::now();
    let report = |line: &str| say(settings, &format!("  {line}"));
    let status = runtime()?.block_on(async {
        let provider = provider(config, settings).await?;
        let outcome = provider
            .up(super::plan::INITIAL_RELEASE, &report)
            .await
            .map_err(failed)?;
        let status = provider.status().await.map_err(failed)?;
        Ok::<_, Failure>((outcome, status))
    })?;
    let (outcome, status) = status;
    let summary = outcome.plan.summary();
    let verb = if outcome.plan.is_empty() {
        "was already up: nothing to do".to_owned()
    } else {
        format!(
            "is up ({} created, {} updated, {} replaced, {} deleted)",
            summary.create, summary.update, summary.replace, summary.delete
        )
    };
    say(
        settings,
        &format!(
            "{}/{} {verb} ({:.1} s)",
            status.project,
            status.environment,
            started.elapsed().as_secs_f64()
        ),
    );
    println!("{}", status.urls.first().map_or("", String::as_str));
    Ok(())
}

pub(crate) fn down(args: DownArgs, settings: &Settings) -> Result<(), Failure> {
    // On AWS, down deletes the data volumes and the secrets too: `--purge` is implied, and
    // the confirmation is always asked unless --yes.
    let DownArgs { purge: _, yes } = args;
    let config = super::load_config(settings)?;
    if settings.endpoint_url.is_none() && !rigger_aws::client::credentials_configured() {
        return Err(no_credentials());
    }
    let project = config.project.name.clone();
    if !yes {
        confirm(
            &format!(
                "This deletes every resource tagged {project}/{env} on AWS, the database volumes and the secrets included. Type the environment's name to confirm: ",
                env = settings.environment
            ),
            &settings.environment,
        )?;
    }
    let report = |line: &str| say(settings, &format!("  {line}"));
    let plan = runtime()?.block_on(async {
        let provider = provider(config, settings).await?;
        provider.down(&report).await.map_err(failed)
    })?;
    say(
        settings,
        &format!(
            "{project}/{} is down ({} resources deleted)",
            settings.environment,
            plan.summary().delete
        ),
    );
    Ok(())
}

fn confirm(question: &str, expected: &str) -> Result<(), Failure> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(Failure::Usage(anyhow!(
            "refusing to delete an AWS environment without confirmation; pass --yes"
        )));
    }
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    stdin
        .lock()
        .read_line(&mut answer)
        .context("reading the confirmation")?;
    if answer.trim() != expected {
        return Err(Failure::Usage(anyhow!(
            "not confirmed; nothing was deleted"
        )));
    }
    Ok(())
}

/// The environment's running servers and their addresses, for `rigger exec`, `logs`,
/// `manage` and `ssh`.
pub(crate) fn servers(
    config: &Config,
    settings: &Settings,
) -> Result<Vec<rigger_aws::LiveServer>, Failure> {
    if settings.endpoint_url.is_none() && !rigger_aws::client::credentials_configured() {
        return Err(no_credentials());
    }
    runtime()?.block_on(async {
        let provider = provider(config.clone(), settings).await?;
        provider.servers().await.map_err(failed)
    })
}

pub(crate) fn status(args: StatusArgs, settings: &Settings) -> Result<(), Failure> {
    let StatusArgs { json } = args;
    let config = super::load_config(settings)?;
    if settings.endpoint_url.is_none() && !rigger_aws::client::credentials_configured() {
        return Err(no_credentials());
    }
    let status = runtime()?.block_on(async {
        let provider = provider(config, settings).await?;
        provider.status().await.map_err(failed)
    })?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).context("encoding the status")?
        );
        return Ok(());
    }
    print!("{}", render(&status));
    Ok(())
}

fn render(status: &rigger_aws::status::Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}/{}  provider aws  release {}  {:?}: {}",
        status.project, status.environment, status.release, status.phase, status.message
    );
    for url in &status.urls {
        let _ = writeln!(out, "  {url}");
    }
    for group in &status.groups {
        let _ = writeln!(
            out,
            "group {:<7} min {} desired {} max {}",
            group.name, group.min, group.desired, group.max
        );
    }
    if status.servers.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "{:<13} {:<16} {:<15} {:<12} LB",
        "SERVER", "ROLES", "ADDRESS", "STATE"
    );
    for server in &status.servers {
        let _ = writeln!(
            out,
            "{:<13} {:<16} {:<15} {:<12} {}",
            server.id,
            server.roles.join(","),
            server.address,
            server.state,
            server.load_balancer.as_deref().unwrap_or("-"),
        );
    }
    out
}
