//! [`LocalTransport`]: a local provider's server is a directory on this machine, so "running
//! a command on it" is starting a process here, in that server's context: its directory as the
//! default working directory, the job's user (through `setpriv`, see [`crate::wrap`]), and a
//! clean environment rather than rigger's own.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::{BoxFuture, ExitStatus, Job, OutputSink, Transport, TransportError, wrap};

/// `PATH` of every command (Debian's default for root).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Variables passed on from rigger's own environment: the terminal and the locale.
const PASSED_ON: [&str; 4] = ["TERM", "LANG", "LC_ALL", "TZ"];

/// One local provider server.
#[derive(Debug, Clone)]
pub struct LocalTransport {
    server: String,
    address: String,
    dir: PathBuf,
    current_user: String,
}

impl LocalTransport {
    /// The server `server` (`web-1`) at `address`, whose directory is `dir`
    /// (`<state>/servers/web-1`).
    pub fn new(
        server: impl Into<String>,
        address: impl Into<String>,
        dir: impl Into<PathBuf>,
    ) -> Self {
        LocalTransport {
            server: server.into(),
            address: address.into(),
            dir: dir.into(),
            current_user: current_user(),
        }
    }

    /// The server's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The process `job` runs in, before its standard streams are chosen.
    fn process(&self, job: &Job) -> tokio::process::Command {
        let command = wrap::local_command(job, &self.current_user);
        let user = job.command.user.as_deref().unwrap_or(&self.current_user);
        let mut process = tokio::process::Command::new(&command.program);
        process
            .args(&command.args)
            .env_clear()
            .envs(base_environment(user, &self.server))
            .envs(&command.env)
            .current_dir(command.cwd.as_deref().unwrap_or(&self.dir));
        process
    }

    fn io_error(&self, what: String, source: std::io::Error) -> TransportError {
        TransportError::Io {
            server: self.server.clone(),
            what,
            source,
        }
    }
}

impl Transport for LocalTransport {
    fn server(&self) -> &str {
        &self.server
    }

    fn describe(&self) -> String {
        format!("local {} ({})", self.address, self.dir.display())
    }

    fn connect(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            if self.dir.is_dir() {
                Ok(())
            } else {
                Err(TransportError::Unreachable {
                    server: self.server.clone(),
                    address: self.address.clone(),
                    reason: format!(
                        "its directory {} does not exist (was the server replaced? `rigger status` lists the current ones)",
                        self.dir.display()
                    ),
                })
            }
        })
    }

    fn run<'a>(
        &'a self,
        job: &'a Job,
        output: &'a dyn OutputSink,
    ) -> BoxFuture<'a, Result<ExitStatus, TransportError>> {
        Box::pin(async move {
            let mut process = self.process(job);
            process
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            let program = process
                .as_std()
                .get_program()
                .to_string_lossy()
                .into_owned();
            let mut child = process.spawn().map_err(|source| TransportError::Spawn {
                server: self.server.clone(),
                program: program.clone(),
                source,
            })?;
            let (status, _) = crate::stream::pump(&mut child, output)
                .await
                .map_err(|source| {
                    self.io_error(format!("reading the output of `{program}`"), source)
                })?;
            Ok(ExitStatus::from_std(status))
        })
    }

    fn copy_file<'a>(
        &'a self,
        source: &'a Path,
        destination: &'a Path,
        mode: u32,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let temporary = PathBuf::from(format!("{}.rigger-tmp", destination.display()));
            let copy = async {
                tokio::fs::copy(source, &temporary).await?;
                tokio::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode))
                    .await?;
                tokio::fs::rename(&temporary, destination).await
            };
            copy.await.map_err(|error| {
                let _ = std::fs::remove_file(&temporary);
                TransportError::Copy {
                    server: self.server.clone(),
                    source_path: source.to_path_buf(),
                    destination: destination.to_path_buf(),
                    reason: error.to_string(),
                }
            })
        })
    }

    fn interactive(&self, job: Option<&Job>, _tty: bool) -> std::process::Command {
        match job {
            Some(job) => {
                let mut process = self.process(job).into_std();
                process.stdin(Stdio::inherit());
                process
            }
            None => {
                let shell = std::env::var("SHELL")
                    .ok()
                    .filter(|shell| shell.starts_with('/'))
                    .unwrap_or_else(|| "/bin/sh".to_owned());
                let mut process = std::process::Command::new(shell);
                process
                    .env_clear()
                    .envs(base_environment(&self.current_user, &self.server))
                    .env("RIGGER_SERVER_DIR", &self.dir)
                    .env("RIGGER_SERVER_ADDRESS", &self.address)
                    .current_dir(&self.dir);
                process
            }
        }
    }
}

/// The environment every local command starts from: `PATH`, the terminal and locale, and the
/// identity of `user` (`HOME`, `USER`, `LOGNAME`, `SHELL` from the password database), plus
/// `RIGGER_SERVER`.
pub fn base_environment(user: &str, server: &str) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = PASSED_ON
        .iter()
        .filter_map(|key| Some(((*key).to_owned(), std::env::var(key).ok()?)))
        .collect();
    env.insert("PATH".into(), DEFAULT_PATH.into());
    env.insert("USER".into(), user.into());
    env.insert("LOGNAME".into(), user.into());
    if let Ok(Some(entry)) = nix::unistd::User::from_name(user) {
        env.insert("HOME".into(), entry.dir.display().to_string());
        env.insert("SHELL".into(), entry.shell.display().to_string());
    }
    env.insert("RIGGER_SERVER".into(), server.into());
    env
}

/// The name of the user rigger runs as (its uid as text when it has no name).
pub fn current_user() -> String {
    let uid = nix::unistd::geteuid();
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |user| user.name)
}
