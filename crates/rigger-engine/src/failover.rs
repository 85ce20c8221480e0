//! The failover to a replica (`rigger db promote`), written once for every provider.
//!
//! Planned: pause every app server's PgBouncer (transactions in flight finish, new ones wait;
//! each pool with a deadline that resumes it by itself should rigger die,
//! [`PAUSE_DEADLINE`]), wait until the replica has replayed everything the primary wrote,
//! promote it, fence the old primary and give the new one its role ([`FailoverTarget::switch`]),
//! repoint every app server at it, resume. Writes wait a few seconds; none is lost.
//!
//! Forced (`--force`, the primary is gone) or resumed (an interrupted failover: no primary
//! left to ask): pausing failures do not stop it, there is nothing to wait for, and the outcome
//! says how much WAL the replica was behind when the primary could still be asked.
//!
//! Until the promotion nothing has changed: any failure resumes the pools and says so. The
//! promotion starts only with [`PROMOTE_BUDGET`] left of the pools' deadline, so a deadline
//! never resumes writes onto an old primary that is not fenced yet. After it, the pools resume
//! whatever happens (their deadline would, later). Every statement is
//! [`rigger_recipes::sql`]'s; promoting is a no-op on a server already promoted, so a re-run
//! after an interruption goes on from where it stopped.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use rigger_recipes::operations::{PAUSE_DEADLINE, PROMOTE_BUDGET};
use rigger_recipes::sql;
use tokio::time::Instant;

/// How long the replica may take to replay what the primary wrote before a planned failover
/// gives up (and resumes, changing nothing).
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the replica is asked whether it caught up.
const CATCH_UP_POLL: Duration = Duration::from_millis(100);

/// Which failover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failover {
    /// The primary's server, when there is one to ask (`None`: fenced by an interrupted
    /// failover, or gone).
    pub primary: Option<String>,
    /// The replica to promote.
    pub replica: String,
    /// The name the replica streams as (`application_name`, its recipe id), which the
    /// primary's `pg_stat_replication` knows it by.
    pub replica_application_name: String,
    /// The primary may be gone: do not wait for the replica, accept losing what it lacks.
    pub force: bool,
}

impl Failover {
    /// Nothing to wait for: forced, or no primary to wait on.
    fn unplanned(&self) -> bool {
        self.force || self.primary.is_none()
    }
}

/// A failover done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promoted<S> {
    /// What the provider's switch did (the fenced server, replicas to rebuild).
    pub switched: S,
    /// Why writes may have been lost (forced failovers), empty when none were.
    pub lost: String,
    /// How long writes were held, from the first pause to the resume.
    pub writes_held: Duration,
    /// App servers whose PgBouncer could not be resumed (their deadline will).
    pub not_resumed: Vec<String>,
}

/// Why a failover stopped, and whether it changed anything: a failover that changed nothing
/// (refused before the promotion; writes resumed) is over, one that did must be finished by
/// running it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverError {
    pub why: String,
    /// The replica may be promoted: the failover must be run again to finish.
    pub changed: bool,
}

impl std::fmt::Display for FailoverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

impl std::error::Error for FailoverError {}

/// How a provider does each step of a failover.
pub trait FailoverTarget: Send {
    type Error: Display + Send;
    /// What [`FailoverTarget::switch`] tells of what it did.
    type Switched: Send;

    /// Arms each app server's pause deadline, then pauses its PgBouncer; the servers that
    /// failed, each with why.
    fn pause_pools(&mut self) -> impl Future<Output = Vec<String>> + Send;
    /// Resumes every app server's PgBouncer (after `RECONNECT` when `reconnect`: connections
    /// made to the old primary go) and disarms its deadline; the servers that failed.
    fn resume_pools(&mut self, reconnect: bool) -> impl Future<Output = Vec<String>> + Send;
    /// One SQL statement as the superuser on a database server; its output.
    fn query(
        &mut self,
        server: &str,
        sql: &str,
    ) -> impl Future<Output = Result<String, Self::Error>> + Send;
    /// The point of no return is next: records, where a successor finds it, that the replica
    /// may be promoted from now on, so that whatever takes over after a crash finishes the
    /// switch (fences the old primary, makes the replica the primary) instead of starting the
    /// old primary again beside a promoted replica. Undone by [`FailoverTarget::switch`].
    fn promoting(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// The replica is promoted: fence the old primary (it never accepts a write again), give
    /// the promoted server the primary's role and configuration, deal with the other replicas.
    fn switch(&mut self) -> impl Future<Output = Result<Self::Switched, Self::Error>> + Send;
    /// Points every app server's stunnel and PgBouncer at the databases where they now are.
    fn repoint(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// A step's progress, for the operator.
    fn report(&mut self, message: &str);
}

/// What a replica had of its lost primary's writes, from [`sql::LAST_RECEIVED`]'s answer:
/// "had received WAL up to 0/3000060, its last replayed transaction 12 s before this
/// promotion". `None` when the answer is not a WAL position (nothing checked is invented).
fn what_the_replica_had(answer: &str) -> Option<String> {
    let mut words = answer.split_whitespace();
    let position = words.next().filter(|lsn| sql::is_lsn(lsn))?;
    let replayed = match words.next().and_then(|s| s.parse::<u64>().ok()) {
        Some(seconds) => {
            format!(", its last replayed transaction {seconds} s before this promotion")
        }
        None => String::new(),
    };
    Some(format!("had received WAL up to {position}{replayed}"))
}

/// Fails over as [`Failover`] says. `Err` says why; when it ends with "nothing was changed,
/// writes resumed", the primary is still the primary.
pub async fn promote<T: FailoverTarget>(
    target: &mut T,
    failover: &Failover,
) -> Result<Promoted<T::Switched>, FailoverError> {
    let paused_at = Instant::now();
    target.report("pausing PgBouncer on every web and worker server");
    let not_paused = target.pause_pools().await;
    if !not_paused.is_empty() && !failover.unplanned() {
        return Err(refuse(
            target,
            format!("pausing PgBouncer failed on: {}", not_paused.join("; ")),
        )
        .await);
    }
    let mut lost = String::new();
    if failover.unplanned() {
        if let Some(primary) = &failover.primary {
            let lag = target
                .query(
                    primary,
                    &sql::replica_lag_bytes(&failover.replica_application_name),
                )
                .await
                .ok()
                .and_then(|out| out.trim().parse::<i64>().ok());
            lost = match lag {
                Some(0) => String::new(),
                Some(bytes) => format!(
                    "the replica was {bytes} bytes of WAL behind: writes after that point are lost"
                ),
                None => {
                    let had = target
                        .query(&failover.replica, sql::LAST_RECEIVED)
                        .await
                        .ok()
                        .and_then(|out| what_the_replica_had(&out));
                    format!(
                        "the primary could not be asked how far behind the replica was{}: the \
                         writes it acknowledged after that may be lost",
                        had.map_or(String::new(), |had| format!("; the replica {had}"))
                    )
                }
            };
        }
    } else if let Err(why) = wait_caught_up(target, failover).await {
        return Err(refuse(target, why).await);
    }
    // Past this point the old primary must be fenced before any pool's deadline resumes it:
    // go on only with time left for promoting and fencing (the deadlines were armed after
    // `paused_at`).
    let elapsed = paused_at.elapsed();
    if elapsed + PROMOTE_BUDGET > PAUSE_DEADLINE {
        let why = format!(
            "pausing and catching up took {:.0} s of the pools' {} s pause deadline, leaving less \
             than the {} s promoting and fencing may take",
            elapsed.as_secs_f64(),
            PAUSE_DEADLINE.as_secs(),
            PROMOTE_BUDGET.as_secs()
        );
        return Err(refuse(target, why).await);
    }
    if let Err(error) = target.promoting().await {
        let why = format!("recording the promotion of {}: {error}", failover.replica);
        return Err(refuse(target, why).await);
    }
    target.report(&format!("promoting {}", failover.replica));
    if let Err(error) = target
        .query(&failover.replica, sql::PROMOTE_IF_IN_RECOVERY)
        .await
    {
        let why = format!("promoting {}: {error}", failover.replica);
        return Err(refuse(target, why).await);
    }
    let switched = target.switch().await;
    let repointed = match &switched {
        Ok(_) => target.repoint().await,
        Err(_) => Ok(()),
    };
    // Whatever happened, the pools resume now (their deadline would, later); connections
    // made through the old tunnels go first.
    let not_resumed = target.resume_pools(true).await;
    let writes_held = paused_at.elapsed();
    let switched = switched.map_err(|error| FailoverError {
        why: format!(
            "{} is promoted, but fencing the old primary and giving it the primary's role failed: {error}; run `rigger db promote` again to finish",
            failover.replica
        ),
        changed: true,
    })?;
    repointed.map_err(|error| FailoverError {
        why: format!(
            "{} is the primary, but repointing the web and worker servers failed: {error}; run `rigger db promote` again to finish",
            failover.replica
        ),
        changed: true,
    })?;
    Ok(Promoted {
        switched,
        lost,
        writes_held,
        not_resumed,
    })
}

/// Resumes every pool (nothing was changed) and returns the reason, saying so.
async fn refuse<T: FailoverTarget>(target: &mut T, why: String) -> FailoverError {
    let not_resumed = target.resume_pools(false).await;
    let why = if not_resumed.is_empty() {
        format!("{why}; nothing was changed, writes resumed")
    } else {
        format!(
            "{why}; nothing was changed; resuming PgBouncer failed on {} (their pause deadline resumes them)",
            not_resumed.join("; ")
        )
    };
    FailoverError {
        why,
        changed: false,
    }
}

/// Waits until the replica has replayed everything the primary has written.
async fn wait_caught_up<T: FailoverTarget>(
    target: &mut T,
    failover: &Failover,
) -> Result<(), String> {
    let Some(primary) = &failover.primary else {
        return Ok(());
    };
    let position = target
        .query(primary, sql::CURRENT_WAL_POSITION)
        .await
        .map_err(|error| format!("reading the primary's WAL position: {error}"))?;
    let position = position.trim();
    let caught_up = sql::replayed_up_to(position)
        .ok_or_else(|| format!("the primary answered `{position}` for its WAL position"))?;
    let started = Instant::now();
    loop {
        let answer = target
            .query(&failover.replica, &caught_up)
            .await
            .map_err(|error| format!("reading the replica's position: {error}"))?;
        if answer.trim() == "t" {
            return Ok(());
        }
        if started.elapsed() > CATCH_UP_TIMEOUT {
            return Err(format!(
                "{} did not replay up to {position} within {} s",
                failover.replica,
                CATCH_UP_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(CATCH_UP_POLL).await;
    }
}

#[cfg(test)]
mod tests;
