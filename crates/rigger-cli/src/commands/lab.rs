//! `rigger lab image | up | down | status | run`: the AWS lab (crates/rigger-lab,
//! docs/lab.md). Needs no rigger.toml.

use std::ffi::OsString;

use anyhow::Context as _;
use rigger_lab::Lab;
use rigger_lab::control::{self, UpOptions, UpOutcome};
use rigger_lab::image::{self, Built, Flavor};
use rigger_lab::status::LabStatus;

use super::{runtime, say};
use crate::args::{LabArgs, LabCommand, LabStatusArgs, LabUpArgs};
use crate::{Failure, Settings};

pub(crate) fn run(args: LabArgs, settings: &Settings) -> Result<(), Failure> {
    if let Some(url) = &settings.endpoint_url {
        return Err(Failure::Usage(anyhow::anyhow!(
            "--endpoint-url {url} is for AWS environments: the lab starts an emulator of its own \
             (`rigger lab status` prints its endpoint)"
        )));
    }
    let lab = Lab::new(&args.dir, &args.images).map_err(Failure::Usage)?;
    match args.command {
        LabCommand::Image => build_image(&lab, settings),
        LabCommand::Up(up_args) => up(&lab, up_args, settings),
        LabCommand::Down => down(&lab, settings),
        LabCommand::Status(status_args) => status(&lab, status_args),
        LabCommand::Run => runtime()?
            .block_on(rigger_lab::runner::run(lab))
            .map_err(Failure::Operation),
    }
}

/// Builds (or finds) both lab images; prints each AMI as `FLAVOR AMI` on stdout.
fn build_image(lab: &Lab, settings: &Settings) -> Result<(), Failure> {
    let running = control::status(lab)?;
    for flavor in Flavor::ALL {
        let (image, built) = image::build(&lab.images, flavor, &super::report::steps(settings))?;
        let size = image.size_bytes as f64 / 1e6;
        let hash = &image.hash[..16];
        let rootfs = image.rootfs.display();
        say(
            settings,
            &match built {
                Built::Cached => {
                    format!("{flavor} lab image {hash} is built ({size:.0} MB, {rootfs})")
                }
                Built::Now => format!(
                    "built the {flavor} lab image {hash} in {:.0} s ({size:.0} MB, {rootfs})",
                    image.build_seconds
                ),
            },
        );
        if running.state == "up" && running.amis.get(flavor.as_str()) != Some(&image.ami_id) {
            say(
                settings,
                &format!(
                    "the running lab uses an older {flavor} image: `rigger lab down && rigger lab up` to use this one"
                ),
            );
        }
        println!("{flavor} {}", image.ami_id);
    }
    Ok(())
}

fn up(lab: &Lab, args: LabUpArgs, settings: &Settings) -> Result<(), Failure> {
    let emulator = control::find_emulator(args.emulator.as_deref()).map_err(Failure::Usage)?;
    let rigger = std::env::current_exe().context("finding the rigger executable")?;
    let runner: Vec<OsString> = vec![
        rigger.into_os_string(),
        "lab".into(),
        "--dir".into(),
        lab.state.clone().into_os_string(),
        "--images".into(),
        lab.images.clone().into_os_string(),
        "-v".into(),
        "run".into(),
    ];
    let options = UpOptions {
        region: args.region,
        emulator,
        runner,
    };
    let outcome =
        runtime()?.block_on(control::up(lab, &options, &super::report::steps(settings)))?;
    let status = match outcome {
        UpOutcome::Started(status) => status,
        UpOutcome::AlreadyUp(status) => {
            say(settings, "the lab is already up");
            status
        }
    };
    print_status(&status);
    Ok(())
}

fn down(lab: &Lab, settings: &Settings) -> Result<(), Failure> {
    runtime()?.block_on(control::down(lab, &super::report::steps(settings)))?;
    say(settings, "the lab is down; nothing of it is left");
    Ok(())
}

fn status(lab: &Lab, args: LabStatusArgs) -> Result<(), Failure> {
    let status = control::status(lab)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).context("encoding the status")?
        );
    } else {
        print_status(&status);
    }
    Ok(())
}

fn print_status(status: &LabStatus) {
    println!("lab: {}", status.state);
    if let Some(endpoint) = &status.endpoint {
        println!("endpoint: {endpoint}   (--endpoint-url)");
    }
    if let Some(ami) = &status.ami {
        println!("ami: {ami}   (baked: every role's packages)");
    }
    if let Some(stock) = status.amis.get(Flavor::Stock.as_str()) {
        println!(
            "stock ami: {stock}   (Debian's EC2 AMI as it is; boots install from Debian's archive)"
        );
    }
    if let Some(region) = &status.region {
        println!("region: {region}");
    }
    if let (Some(network), Some(address)) = (&status.network, &status.lab_address) {
        println!(
            "network: {network}, reached from {address} in namespace {}: ip netns exec {} ssh admin@ADDRESS",
            status.namespace, status.namespace
        );
    }
    if let Some(bastion) = &status.bastion {
        println!(
            "bastion: {}   (rigger.toml: bastion = \"{}\"; known_hosts: {})",
            bastion.target, bastion.target, bastion.known_hosts_line
        );
    }
    if let Some(message) = status.message.as_ref().filter(|_| status.state != "up") {
        println!("runner: {message}");
    }
    if !status.machines.is_empty() {
        println!("machines:");
        for machine in &status.machines {
            let memory = machine
                .memory_pss_bytes
                .map(|b| format!("  {:.0} MiB", b as f64 / 1_048_576.0))
                .unwrap_or_default();
            println!(
                "  {}  {:<15}  {} (instance {}){memory}{}",
                machine.instance_id,
                machine.address.as_deref().unwrap_or("-"),
                machine.state.as_str(),
                machine.instance_state,
                machine
                    .detail
                    .as_deref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            );
        }
    }
    if !status.load_balancers.is_empty() {
        println!("load balancers:");
        for balancer in &status.load_balancers {
            println!("  {}  {}  ({})", balancer.name, balancer.url, balancer.kind);
            for backend in &balancer.backends {
                println!(
                    "    {}  {:<15}  {}{}",
                    backend.instance_id,
                    backend.address.as_deref().unwrap_or("-"),
                    backend.state,
                    backend
                        .target_group
                        .as_ref()
                        .map(|group| format!("  (target group {group})"))
                        .unwrap_or_default()
                );
            }
        }
    }
    for leftover in &status.leftovers {
        println!("left over: {leftover}   (`rigger lab down` removes it)");
    }
}
