//! How each server's boot went, as the server reports it.
//!
//! An instance is `running` (and a group's member `InService`) as soon as it starts, long
//! before its user-data has installed, configured and started anything: neither says the
//! server works. So the boot script reports its own outcome, in the SSM parameter
//! `/<project>/<env>/boot/<instance id>` only its own instance profile may write
//! ([`crate::hostkeys`]): `finished` after its last step, or `failed: <step> (exit N)` when a
//! step fails. `up` waits for every server's report and stops at the first failure, naming
//! it; a rolling deploy counts a new server healthy only once it has reported `finished`
//! (and, for web servers, the load balancer agrees), and rolls back at once when it reports
//! a failure.
//!
//! Against an emulator whose instances are not machines nothing ever reports, so reports are
//! awaited only where servers are machines (`Provider::servers_are_machines`).

use std::collections::BTreeMap;

use crate::Clients;
use crate::environment::AwsEnvironment;
use crate::error::AwsError;

/// What a server's boot script reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootReport {
    /// Every step ran.
    Finished,
    /// A step failed: the script's own words (the step and its exit status).
    Failed(String),
}

/// The report a boot script writes when its last step has run.
pub const FINISHED: &str = "finished";
/// What a failure report starts with, before the step and its exit status.
pub const FAILED: &str = "failed: ";

impl BootReport {
    /// Reads a parameter's value; anything but a report rigger writes is a failure, quoted.
    pub fn parse(value: &str) -> BootReport {
        let value = value.trim();
        if value == FINISHED {
            BootReport::Finished
        } else if let Some(why) = value.strip_prefix(FAILED) {
            BootReport::Failed(why.to_owned())
        } else {
            BootReport::Failed(format!("an unknown boot report: {value:?}"))
        }
    }
}

/// Every server's boot report, by instance id (a server still booting has none).
pub async fn reports(
    env: &AwsEnvironment,
    clients: &Clients,
) -> Result<BTreeMap<String, BootReport>, AwsError> {
    Ok(
        crate::hostkeys::published_under(env, clients, crate::hostkeys::BOOT)
            .await?
            .into_iter()
            .map(|(id, value)| (id, BootReport::parse(&value)))
            .collect(),
    )
}

/// The parameter instance `instance_id` reports its boot in.
pub fn parameter(env: &AwsEnvironment, instance_id: &str) -> String {
    format!("{}{instance_id}", env.parameter(crate::hostkeys::BOOT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_finished_failed_or_unknown() {
        assert_eq!(BootReport::parse("finished\n"), BootReport::Finished);
        assert_eq!(
            BootReport::parse("failed: running the before-start steps (exit 1)"),
            BootReport::Failed("running the before-start steps (exit 1)".into())
        );
        assert_eq!(
            BootReport::parse("done"),
            BootReport::Failed("an unknown boot report: \"done\"".into())
        );
    }
}
