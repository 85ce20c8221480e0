//! The local provider: the whole topology on one machine, each "server" a directory with its own
//! 127.x address, every service a child of one long-running rigger supervisor.
//!
//! This crate is the I/O edge of that provider. [`process`] starts a service in its own process
//! group with exactly the environment and user it was given, records it in a pid file that a
//! later rigger can trust (the pid plus its kernel start time, so a reused pid is never
//! signalled), and stops it and everything it forked. [`probe`] waits until a service answers
//! (TCP, HTTPS or a command) by polling with a short backoff, and stops waiting as soon as the
//! service dies, quoting its log. Start reading at [`process::spawn`] and [`probe::wait_ready`].
//!
//! Architecture invariant: no process started here outlives a `rigger down`: every one is a
//! process-group leader with a pid file, and [`process::stop_leftovers`] finds and stops them all
//! even when the supervisor that started them was killed. A supervisor that died is started
//! again by its [`keeper`], and the new one adopts the services still running
//! ([`process::sort_leftovers`], [`process::wait_for_exit`]) rather than restarting them.

pub mod probe;
pub mod process;

pub mod apply;
pub mod control;
pub mod deploy;
pub mod desired;
pub mod environment;
pub mod files;
pub mod haproxy;
pub mod keeper;
pub mod observe;
pub mod on_server;
pub mod paths;
pub mod pgbouncer;
pub mod prepare;
pub mod registry;
pub mod release;
pub mod safe_fs;
pub mod secrets;
pub mod status;
pub mod supervisor;

/// The supervisor's latest status, when one runs.
fn control_status_snapshot(env: &environment::LocalEnvironment) -> Option<status::Status> {
    supervisor::lock_holder(env)?;
    status::load(&env.paths.status())
}
