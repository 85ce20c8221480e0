//! `rigger image build -e ENV`: bakes every role's packages into an AMI for an AWS
//! environment and records it (`rigger_aws::image`). Ctrl-C or SIGTERM removes the builder
//! before exiting; a run killed outright leaves it tagged, and the next build removes it.

use anyhow::anyhow;
use rigger_aws::image::{self, BuildOptions, BuildOutcome};
use rigger_config::ProviderKind;
use rigger_engine::progress::Progress as _;
use tokio::signal::unix::{SignalKind, signal};

use super::{runtime, say};
use crate::args::{ImageBuildArgs, ImageCommand};
use crate::aws_env::{failed, provider};
use crate::{Failure, Settings};

pub(crate) fn run(
    command: ImageCommand,
    settings: &Settings,
    provider: ProviderKind,
) -> Result<(), Failure> {
    match command {
        ImageCommand::Build(args) => build(args, settings, provider),
    }
}

fn build(args: ImageBuildArgs, settings: &Settings, kind: ProviderKind) -> Result<(), Failure> {
    let config = super::load_config(settings)?;
    if kind != ProviderKind::Aws {
        return Err(Failure::Usage(anyhow!(
            "`{}` is a local environment: `rigger image build` bakes AMIs for AWS environments \
             (the local provider runs on this machine's packages)",
            settings.environment
        )));
    }
    crate::aws_env::require_credentials(settings)?;
    let report = super::report::steps(settings);
    let started = std::time::Instant::now();
    let (outcome, parameter) = runtime()?.block_on(async {
        let provider = provider(config, settings).await?;
        let parameter = image::parameter_name(&provider.env);
        let (network, _) = provider.observe().await.map_err(failed)?;
        let options = BuildOptions {
            force: args.force,
            ..BuildOptions::default()
        };
        let mut terminate = signal(SignalKind::terminate())
            .map_err(|e| Failure::Operation(anyhow!("watching SIGTERM: {e}")))?;
        let mut interrupt = signal(SignalKind::interrupt())
            .map_err(|e| Failure::Operation(anyhow!("watching SIGINT: {e}")))?;
        let building = image::build(&provider.env, &provider.clients, &network, options, &report);
        let signalled = tokio::select! {
            result = building => return result.map(|o| (o, parameter)).map_err(failed),
            _ = interrupt.recv() => "interrupted",
            _ = terminate.recv() => "terminated",
        };
        report.report(&format!("{signalled}: removing the builder"));
        image::clean_up(&provider.env, &provider.clients, options.waits, &report)
            .await
            .map_err(failed)?;
        Err(Failure::Operation(anyhow!(
            "the image build was {signalled}; its builder was removed (an image already being \
             made is finished and used by the next `rigger image build -e {}`)",
            provider.env.name
        )))
    })?;
    let image = outcome.image();
    let message = match &outcome {
        BuildOutcome::Reused(_) => format!(
            "reused image {} (same packages hash {}; `--force` builds a new one)",
            image.ami,
            &image.packages_hash[..12]
        ),
        BuildOutcome::Built {
            builder_seconds,
            image_seconds,
            ..
        } => format!(
            "built image {} from {} in {:.0} s (builder {builder_seconds:.0} s, image {image_seconds:.0} s)",
            image.ami,
            image.base,
            started.elapsed().as_secs_f64()
        ),
    };
    say(settings, &message);
    say(
        settings,
        &format!(
            "recorded in SSM {parameter}: the environment's launch templates and new servers use it (`rigger plan -e {}` shows it)",
            settings.environment
        ),
    );
    println!("{}", image.ami);
    Ok(())
}
