//! One job per server, on many servers at once: at most `parallel` at a time, every output line
//! reported with its server, and an [`Outcome`] per server for the summary.
//!
//! A server that cannot be reached does not stop the others: it ends
//! [`State::Unreachable`] with the reason, the others run. Start at [`run`]; [`summary`] and
//! [`prefixed`] are the pure formatting, tested by comparing text.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{ExitStatus, Job, Stream, Transport, TransportError};

/// Receives the output of every server and hears when each finishes. Called from many tasks
/// at once; a whole line at a time.
pub trait Reporter: Send + Sync {
    /// A line of output of the task labelled `label`.
    fn line(&self, label: &str, stream: Stream, line: &str);
    fn finished(&self, _outcome: &Outcome) {}
}

/// How the job went on one server.
#[derive(Debug)]
pub struct Outcome {
    /// The task's label (the server's name).
    pub server: String,
    /// How it was reached (for messages).
    pub via: String,
    pub result: Result<ExitStatus, TransportError>,
    /// From the start of the connection to the command's end.
    pub duration: Duration,
}

/// The three ways a server's run ends, as the summary counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The command exited 0.
    Ok,
    /// The command ran and failed (or the connection broke while it ran).
    Failed,
    /// The command never ran: the server could not be reached or trusted.
    Unreachable,
}

impl Outcome {
    pub fn state(&self) -> State {
        match &self.result {
            Ok(status) if status.success() => State::Ok,
            Err(error) if error.is_unreachable() => State::Unreachable,
            _ => State::Failed,
        }
    }
}

/// One job on one server, its output prefixed by `label`.
#[derive(Clone)]
pub struct Task {
    /// What output lines and the summary are prefixed by: the server's name, or e.g.
    /// `web-1/nginx` when a server runs several jobs.
    pub label: String,
    pub transport: Arc<dyn Transport>,
    pub job: Job,
}

impl Task {
    /// `job` on `transport`'s server, labelled with the server's name.
    pub fn new(transport: Arc<dyn Transport>, job: Job) -> Task {
        Task {
            label: transport.server().to_owned(),
            transport,
            job,
        }
    }
}

/// Runs each task, at most `parallel` at a time (at least 1), and returns the outcomes in the
/// order of `tasks`.
pub async fn run(tasks: Vec<Task>, parallel: usize, reporter: Arc<dyn Reporter>) -> Vec<Outcome> {
    let permits = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let handles: Vec<_> = tasks
        .into_iter()
        .map(|task| {
            let permits = Arc::clone(&permits);
            let reporter = Arc::clone(&reporter);
            let label = task.label.clone();
            let via = task.transport.describe();
            let handle = tokio::spawn(async move {
                let _permit = permits.acquire_owned().await.expect("never closed");
                let Task {
                    label,
                    transport,
                    job,
                } = task;
                let started = Instant::now();
                let sink = |stream: Stream, line: &str| reporter.line(&label, stream, line);
                let result = match transport.connect().await {
                    Ok(()) => transport.run(&job, &sink).await,
                    Err(error) => Err(error),
                };
                let outcome = Outcome {
                    server: label.clone(),
                    via: transport.describe(),
                    result,
                    duration: started.elapsed(),
                };
                reporter.finished(&outcome);
                outcome
            });
            (label, via, handle)
        })
        .collect();
    let mut outcomes = Vec::with_capacity(handles.len());
    for (label, via, handle) in handles {
        outcomes.push(match handle.await {
            Ok(outcome) => outcome,
            Err(panic) => Outcome {
                server: label.clone(),
                via,
                result: Err(TransportError::Io {
                    server: label,
                    what: "running the job".into(),
                    source: std::io::Error::other(panic.to_string()),
                }),
                duration: Duration::ZERO,
            },
        });
    }
    outcomes
}

/// `server | line`, the server's name padded to `width` so that columns line up.
pub fn prefixed(server: &str, width: usize, line: &str) -> String {
    format!("{server:<width$} | {line}")
}

/// One line per server (state, exit status or reason, duration) and a count:
///
/// ```text
/// web-1  ok           exit 0   0.21 s
/// web-2  failed       exit 3   0.20 s
/// web-3  unreachable  cannot reach web-3 (root@127.90.0.3:22): Connection refused
/// 3 servers: 1 ok, 1 failed, 1 unreachable
/// ```
pub fn summary(outcomes: &[Outcome]) -> String {
    let width = outcomes.iter().map(|o| o.server.len()).max().unwrap_or(0);
    let mut text = String::new();
    for outcome in outcomes {
        let (state, detail) = match (&outcome.result, outcome.state()) {
            (Ok(status), State::Ok) => ("ok", status.to_string()),
            (Ok(status), _) => ("failed", status.to_string()),
            (Err(error), State::Unreachable) => ("unreachable", error.to_string()),
            (Err(error), _) => ("failed", error.to_string()),
        };
        let _ = write!(text, "{:<width$}  {state:<11}  {detail}", outcome.server);
        if outcome.state() == State::Unreachable {
            text.push('\n');
        } else {
            let _ = writeln!(text, "  {:.2} s", outcome.duration.as_secs_f64());
        }
    }
    let count = |state| outcomes.iter().filter(|o| o.state() == state).count();
    let _ = writeln!(
        text,
        "{} server{}: {} ok, {} failed, {} unreachable",
        outcomes.len(),
        if outcomes.len() == 1 { "" } else { "s" },
        count(State::Ok),
        count(State::Failed),
        count(State::Unreachable),
    );
    text
}

/// Whether every server ran the job successfully.
pub fn all_ok(outcomes: &[Outcome]) -> bool {
    outcomes.iter().all(|o| o.state() == State::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(server: &str, result: Result<ExitStatus, TransportError>, ms: u64) -> Outcome {
        Outcome {
            server: server.into(),
            via: String::new(),
            result,
            duration: Duration::from_millis(ms),
        }
    }

    #[test]
    fn summary_counts_ok_failed_and_unreachable() {
        let outcomes = [
            outcome("web-1", Ok(ExitStatus::Code(0)), 210),
            outcome("worker-12", Ok(ExitStatus::Code(3)), 1500),
            outcome(
                "web-3",
                Err(TransportError::Unreachable {
                    server: "web-3".into(),
                    address: "root@127.90.0.3:22".into(),
                    reason: "connect to host 127.90.0.3 port 22: Connection refused".into(),
                }),
                3,
            ),
            outcome("db-primary", Ok(ExitStatus::Signal(9)), 40),
        ];
        assert_eq!(
            summary(&outcomes),
            "\
web-1       ok           exit 0  0.21 s
worker-12   failed       exit 3  1.50 s
web-3       unreachable  cannot reach web-3 (root@127.90.0.3:22): connect to host 127.90.0.3 port 22: Connection refused
db-primary  failed       killed by signal 9  0.04 s
4 servers: 1 ok, 2 failed, 1 unreachable
"
        );
        assert!(!all_ok(&outcomes));
    }

    #[test]
    fn prefixes_line_up() {
        assert_eq!(prefixed("web-1", 9, "hello"), "web-1     | hello");
        assert_eq!(prefixed("worker-12", 9, ""), "worker-12 | ");
    }

    #[test]
    fn a_lost_connection_is_a_failure_not_unreachable() {
        let lost = outcome(
            "web-1",
            Err(TransportError::ConnectionLost {
                server: "web-1".into(),
                address: "a".into(),
                reason: "r".into(),
            }),
            1,
        );
        assert_eq!(lost.state(), State::Failed);
    }
}
