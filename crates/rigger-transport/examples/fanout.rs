//! The fan-out of `rigger exec` over SSH, on a list of hosts instead of an environment's
//! servers: what `bench/ssh-fanout` times.
//!
//! ```text
//! fanout --hosts FILE --user USER --key KEY --host-keys KEYS --state DIR [--parallel N] -- COMMAND...
//! fanout --hosts FILE --user USER --key KEY --host-keys KEYS --state DIR --disconnect
//! ```
//!
//! Runs each COMMAND (a shell line) on every host of FILE (one address a line), one command
//! after the other, each on all hosts at once (at most N at a time, default 10), with each
//! host's key pinned to KEYS/<address>/host_key.pub (`--host-keys KEYS`: what a server rigger
//! created publishes) and master connections in DIR/cm that outlive the process for 60 s, as
//! `rigger exec` does. Output goes to stdout, prefixed; a summary of failures to stderr;
//! exits 1 when any host failed. `--disconnect` closes the master connections instead.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use rigger_transport::fanout::{self, Reporter, Task};
use rigger_transport::ssh::{
    HostKey, HostKeyCheck, PinnedKeys, SshSettings, SshTarget, SshTransport,
};
use rigger_transport::{Command, Job, Stream, Transport};

struct Printer {
    width: usize,
}

impl Reporter for Printer {
    fn line(&self, label: &str, stream: Stream, line: &str) {
        let text = fanout::prefixed(label, self.width, line);
        match stream {
            Stream::Stdout => println!("{text}"),
            Stream::Stderr => eprintln!("{text}"),
        }
    }
}

struct Options {
    hosts: PathBuf,
    user: String,
    key: PathBuf,
    host_keys: PathBuf,
    state: PathBuf,
    parallel: usize,
    disconnect: bool,
    commands: Vec<String>,
}

fn parse() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let (mut hosts, mut user, mut key, mut host_keys, mut state) = (None, None, None, None, None);
    let mut parallel = 10;
    let mut disconnect = false;
    let mut commands = Vec::new();
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--hosts" => hosts = Some(PathBuf::from(value()?)),
            "--user" => user = Some(value()?),
            "--key" => key = Some(PathBuf::from(value()?)),
            "--host-keys" => host_keys = Some(PathBuf::from(value()?)),
            "--state" => state = Some(PathBuf::from(value()?)),
            "--parallel" => {
                parallel = value()?.parse().map_err(|e| format!("--parallel: {e}"))?;
            }
            "--disconnect" => disconnect = true,
            "--" => commands.extend(args.by_ref()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let missing = |name: &str| format!("{name} is required");
    Ok(Options {
        hosts: hosts.ok_or_else(|| missing("--hosts"))?,
        user: user.ok_or_else(|| missing("--user"))?,
        key: key.ok_or_else(|| missing("--key"))?,
        host_keys: host_keys.ok_or_else(|| missing("--host-keys"))?,
        state: state.ok_or_else(|| missing("--state"))?,
        parallel,
        disconnect,
        commands,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let options = match parse() {
        Ok(options) => options,
        Err(error) => {
            eprintln!("fanout: {error}");
            return ExitCode::from(2);
        }
    };
    let settings = Arc::new(SshSettings::new(
        options.state.join("known_hosts"),
        options.state.join("cm"),
    ));
    if let Err(error) = settings.prepare() {
        eprintln!("fanout: {error}");
        return ExitCode::FAILURE;
    }
    let hosts = std::fs::read_to_string(&options.hosts).unwrap_or_default();
    let mut transports: Vec<Arc<SshTransport>> = Vec::new();
    for host in hosts.split_whitespace() {
        let file = options.host_keys.join(host).join("host_key.pub");
        let pinned = std::fs::read_to_string(&file)
            .map_err(|e| format!("reading {}: {e}", file.display()))
            .and_then(|text| HostKey::parse_all(&text))
            .and_then(|keys| PinnedKeys::new(host, keys, file.display().to_string()));
        let pinned = match pinned {
            Ok(pinned) => pinned,
            Err(error) => {
                eprintln!("fanout: {host}: {error}");
                return ExitCode::from(2);
            }
        };
        let target = SshTarget {
            identity_file: Some(options.key.clone()),
            host_keys: HostKeyCheck::Pinned(pinned),
            ..SshTarget::new(host, options.user.clone())
        };
        transports.push(Arc::new(SshTransport::new(
            host,
            target,
            Arc::clone(&settings),
        )));
    }
    if options.disconnect {
        for transport in &transports {
            transport.disconnect().await;
        }
        return ExitCode::SUCCESS;
    }
    let width = transports
        .iter()
        .map(|t| t.server().len())
        .max()
        .unwrap_or(0);
    let printer: Arc<dyn Reporter> = Arc::new(Printer { width });
    let mut ok = true;
    for line in &options.commands {
        let job = Job::new(Command::new("/bin/sh").args(["-c", line.as_str()]));
        let tasks = transports
            .iter()
            .map(|t| Task::new(Arc::clone(t) as Arc<dyn Transport>, job.clone()))
            .collect();
        let outcomes = fanout::run(tasks, options.parallel, Arc::clone(&printer)).await;
        if !fanout::all_ok(&outcomes) {
            ok = false;
            eprint!("`{line}`:\n{}", fanout::summary(&outcomes));
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
