//! Running a job on one of the environment's servers as the AWS provider does over SSH: the
//! same `Job` values (`rigger_recipes::operations`: psql, pg_dump, pg_restore), run over the
//! server's [`LocalTransport`] (its directory, the job's user through `setpriv`, a clean
//! environment), as `rigger exec` runs them.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context as _, bail};
use rigger_recipes::operations;
use rigger_transport::local::LocalTransport;
use rigger_transport::{Job, Stream, Transport as _};

use crate::environment::LocalEnvironment;

/// How long a single SQL statement may take before rigger gives up on it.
const PSQL_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `job` on server `id` within `timeout`: its standard output, or an error quoting its
/// standard error.
pub async fn run(
    env: &LocalEnvironment,
    id: &str,
    job: &Job,
    timeout: Duration,
) -> anyhow::Result<String> {
    let transport = LocalTransport::new(id, "local", env.paths.server(id));
    run_over(&transport, job, timeout).await
}

/// Runs `job` in the environment's own context (its state directory; what no one server
/// owns, such as the maintenance page every web server shares), as [`run`] does.
pub async fn run_in_environment(
    env: &LocalEnvironment,
    job: &Job,
    timeout: Duration,
) -> anyhow::Result<String> {
    let transport = LocalTransport::new(env.name.clone(), "local", env.paths.root());
    run_over(&transport, job, timeout).await
}

async fn run_over(
    transport: &LocalTransport,
    job: &Job,
    timeout: Duration,
) -> anyhow::Result<String> {
    let id = transport.server().to_owned();
    let (stdout, stderr) = (Mutex::new(Vec::new()), Mutex::new(Vec::new()));
    let collect = |stream: Stream, line: &str| {
        let lines = if stream == Stream::Stdout {
            &stdout
        } else {
            &stderr
        };
        lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line.to_owned());
    };
    let program = job.command.program.clone();
    let status = tokio::time::timeout(timeout, transport.run(job, &collect))
        .await
        .with_context(|| {
            format!(
                "{program} on {id} did not finish within {} s",
                timeout.as_secs()
            )
        })??;
    let lines = |lines: Mutex<Vec<String>>| lines.into_inner().unwrap_or_else(|e| e.into_inner());
    if !status.success() {
        bail!(
            "{program} on {id}: {status}: {}",
            lines(stderr).join("\n").trim()
        );
    }
    Ok(lines(stdout).join("\n"))
}

/// One SQL statement as the postgres superuser on database server `id`
/// ([`operations::psql`]): rows `|`-separated.
pub async fn psql(env: &LocalEnvironment, id: &str, sql: &str) -> anyhow::Result<String> {
    let job = Job::new(operations::psql(&env.server_layout(id), sql));
    run(env, id, &job, PSQL_TIMEOUT).await
}
