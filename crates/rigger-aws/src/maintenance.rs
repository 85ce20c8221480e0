//! Maintenance mode's record on AWS: the SSM parameter `/<project>/<env>/maintenance`
//! (`on` while in maintenance). The CLI switches the running web servers over SSH
//! ([`rigger_recipes::operations::maintenance_line`]); the record is what a web server booting
//! meanwhile reads ([`crate::userdata`]), and what `status` reports.

use crate::Clients;
use crate::environment::AwsEnvironment;
use crate::error::AwsError;

/// The parameter's name under the environment's prefix.
pub const PARAMETER: &str = "maintenance";

/// Records maintenance mode on or off.
pub async fn set(env: &AwsEnvironment, clients: &Clients, on: bool) -> Result<(), AwsError> {
    let name = env.parameter(PARAMETER);
    if on {
        crate::parameters::put(clients, &name, "on").await
    } else {
        crate::parameters::delete(clients, &name).await
    }
}

/// Whether maintenance mode is on.
pub async fn is_on(env: &AwsEnvironment, clients: &Clients) -> Result<bool, AwsError> {
    Ok(crate::parameters::get(clients, &env.parameter(PARAMETER))
        .await?
        .is_some_and(|v| v == "on"))
}
