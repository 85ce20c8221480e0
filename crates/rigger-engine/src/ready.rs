//! Waiting for an environment to be ready, the same on every provider (`up` ends with it):
//! its status read again until the phase is `ready`; what it waits for reported whenever that
//! changes; given up at once when the status says it cannot come up (a failed bring-up, a
//! server whose boot script failed, which waiting never mends) or the provider says nothing
//! is working on it any more (the local supervisor exited), and after the timeout.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use rigger_plan::status::{Phase, Status};

use crate::progress::Progress;

/// A server's state when its boot script reported a failure (AWS: the boot report in SSM).
pub const BOOT_FAILED: &str = "boot_failed";

/// Where a provider's status comes from while `up` waits.
pub trait ReadySource: Send {
    type Error: Send + fmt::Display;

    /// The environment's status now; `None` when there is none to read yet.
    fn status(&mut self) -> impl Future<Output = Result<Option<Status>, Self::Error>> + Send;

    /// Why the environment can no longer become ready by waiting, when that is so.
    fn gone(&mut self) -> impl Future<Output = Option<String>> + Send;

    /// What the environment is waiting for, in words: by default the servers not in service
    /// with their state (`web[1] (pending, load balancer OutOfService)`), or the status's
    /// message when no server is named.
    fn waiting_for(&self, status: &Status) -> String {
        if status.servers.iter().any(|s| s.state != "in_service") {
            format!("waiting for {}", not_in_service(status))
        } else {
            status.message.clone()
        }
    }
}

/// How often to look, and how long to wait.
#[derive(Debug, Clone, Copy)]
pub struct ReadySettings {
    pub poll: Duration,
    pub timeout: Duration,
}

/// Why the environment is not ready.
#[derive(Debug)]
pub enum NotReady<E> {
    Provider(E),
    /// The status says it cannot come up: its message (a failed bring-up, failed boots).
    Failed(String),
    /// Nothing works on it any more, and why.
    Gone(String),
    TimedOut {
        seconds: u64,
        waiting_for: String,
    },
}

impl<E: fmt::Display> fmt::Display for NotReady<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotReady::Provider(error) => write!(f, "{error}"),
            NotReady::Failed(message) | NotReady::Gone(message) => write!(f, "{message}"),
            NotReady::TimedOut {
                seconds,
                waiting_for,
            } => write!(f, "not ready after {seconds} s: {waiting_for}"),
        }
    }
}

/// Waits until the environment is ready; its status then.
pub async fn wait_until_ready<S: ReadySource>(
    source: &mut S,
    settings: &ReadySettings,
    progress: &dyn Progress,
) -> Result<Status, NotReady<S::Error>> {
    let started = tokio::time::Instant::now();
    let mut said = String::new();
    loop {
        if let Some(status) = source.status().await.map_err(NotReady::Provider)? {
            if status.phase == Phase::Ready {
                if !said.is_empty() {
                    progress.report(&format!(
                        "every server is in service ({:.0} s)",
                        started.elapsed().as_secs_f64()
                    ));
                }
                return Ok(status);
            }
            if status.phase == Phase::Failed
                || status.servers.iter().any(|s| s.state == BOOT_FAILED)
            {
                return Err(NotReady::Failed(status.message));
            }
            let waiting = source.waiting_for(&status);
            if waiting != said {
                progress.report(&waiting);
                said = waiting;
            }
        }
        if let Some(why) = source.gone().await {
            return Err(NotReady::Gone(why));
        }
        if started.elapsed() >= settings.timeout {
            return Err(NotReady::TimedOut {
                seconds: settings.timeout.as_secs(),
                waiting_for: said,
            });
        }
        tokio::time::sleep(settings.poll).await;
    }
}

/// The servers keeping `status` from ready, with their state, or its message when no server
/// is named.
pub fn not_in_service(status: &Status) -> String {
    let servers: Vec<String> = status
        .servers
        .iter()
        .filter(|s| s.state != "in_service")
        .map(|s| match &s.load_balancer {
            Some(lb) => format!("{} ({}, load balancer {lb})", s.id, s.state),
            None => format!("{} ({})", s.id, s.state),
        })
        .collect();
    if servers.is_empty() {
        status.message.clone()
    } else {
        servers.join(", ")
    }
}

#[cfg(test)]
mod tests;
