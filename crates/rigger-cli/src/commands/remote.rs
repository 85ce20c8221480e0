//! `rigger exec`, `manage`, `logs` and `ssh`: operating an environment's servers.
//!
//! Each command resolves the environment's servers into a [`Fleet`]: for each server its id,
//! roles, a [`Transport`] that reaches it and the [`Layout`] of its files, so the commands
//! themselves are provider-neutral: they build [`Job`]s from the layout (pure functions,
//! tested by comparing text) and hand them to `rigger_transport` (`fanout` for many servers,
//! an interactive session for one). A local environment's servers come from its supervisor's
//! `status.json` and are reached with `LocalTransport`; an AWS environment's from its provider
//! ([`rigger_aws::Provider::servers`]), reached over SSH as the deploy user at their public
//! address or through the configured bastion ([`ssh_targets`], a pure function), each checked
//! against the host keys it published at boot (never trusted on first sight).

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use anyhow::anyhow;
use rigger_recipes::{Command, ServiceManager};
use rigger_transport::fanout::{self, Reporter, Task};
use rigger_transport::{ExitStatus, Job, Stream};

use super::{runtime, say};
use crate::args::{ExecArgs, LogsArgs, ManageArgs, SshArgs};
use crate::fleet::{Server, fleet, interact, manage_job};

use crate::{Failure, Settings};

pub(crate) fn exec(args: ExecArgs, settings: &Settings) -> Result<(), Failure> {
    let ExecArgs {
        targets,
        parallel,
        list,
        command,
    } = args;
    let fleet = fleet(settings)?;
    let servers = fleet.select(&targets)?;
    if list {
        print!("{}", listing(&servers));
        return Ok(());
    }
    let line = command.join(" ");
    let job = exec_job(&line);
    let tasks = servers
        .iter()
        .map(|server| Task::new(Arc::clone(&server.transport), job.clone()))
        .collect();
    let outcomes = run_tasks(tasks, usize::from(parallel))?;
    if settings.verbosity >= 0 {
        eprint!("{}", fanout::summary(&outcomes));
    }
    let failed = outcomes
        .iter()
        .filter(|o| o.state() != fanout::State::Ok)
        .count();
    if failed == 0 {
        Ok(())
    } else {
        Err(Failure::Operation(anyhow!(
            "`{line}` did not succeed on {failed} of {} servers",
            outcomes.len()
        )))
    }
}

pub(crate) fn manage(args: ManageArgs, settings: &Settings) -> Result<(), Failure> {
    let ManageArgs { server, args } = args;
    let fleet = fleet(settings)?;
    let server = fleet.manage_server(server.as_deref())?;
    let job = manage_job(&server.layout, &args);
    if server.layout.service_manager == ServiceManager::Rigger
        && !Path::new(&job.command.program).exists()
    {
        return Err(Failure::Operation(anyhow!(
            "cannot find the app's venv on {} (no Celery or gunicorn process of it is running); `rigger status` shows what runs",
            server.id
        )));
    }
    say(
        settings,
        &format!("manage.py {} on {}", args.join(" "), server.id),
    );
    let status = interact(server, Some(&job))?;
    if status.success() {
        Ok(())
    } else {
        Err(Failure::Operation(anyhow!(
            "`manage.py {}` on {} ended with {status}",
            args.join(" "),
            server.id
        )))
    }
}

pub(crate) fn logs(args: LogsArgs, settings: &Settings) -> Result<(), Failure> {
    let LogsArgs {
        target,
        follow,
        service,
        lines,
    } = args;
    let fleet = fleet(settings)?;
    let servers = fleet.select(std::slice::from_ref(&target))?;
    let mut tasks = Vec::new();
    for server in &servers {
        for (label, job) in log_jobs(server, service.as_deref(), lines, follow) {
            tasks.push(Task {
                label,
                transport: Arc::clone(&server.transport),
                job,
            });
        }
    }
    if tasks.is_empty() {
        let known = local_services(&servers);
        return Err(Failure::Usage(anyhow!(
            "no {} log on {target}; the logs there are: {}",
            service.as_deref().unwrap_or("service"),
            if known.is_empty() {
                "none yet".to_owned()
            } else {
                known.join(", ")
            }
        )));
    }
    let parallel = tasks.len();
    let outcomes = run_tasks(tasks, parallel)?;
    let failures: Vec<String> = outcomes
        .iter()
        .filter(|o| o.state() != fanout::State::Ok)
        .map(|o| match &o.result {
            Ok(status) => format!("{}: {status}", o.server),
            Err(error) => error.to_string(),
        })
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Failure::Operation(anyhow!(
            "reading logs failed: {}",
            failures.join("; ")
        )))
    }
}

pub(crate) fn ssh(args: SshArgs, settings: &Settings) -> Result<(), Failure> {
    let SshArgs { server } = args;
    let fleet = fleet(settings)?;
    let server = fleet.find(&server)?;
    let status = interact(server, None)?;
    // ssh's own failures are 255; a shell's last status is the user's business.
    if server.ssh.is_some() && status == ExitStatus::Code(255) {
        return Err(Failure::Operation(anyhow!(
            "the SSH session to {} failed (see above)",
            server.id
        )));
    }
    Ok(())
}

fn exec_job(line: &str) -> Job {
    Job::new(Command::new("/bin/sh").args(["-c", line]))
}

/// The jobs that show `server`'s logs, with their labels: the last `lines` lines of each
/// service's log (`--service`: that one only), then new ones when `follow`. Under rigger's
/// supervisor each service logs to `log/<service>.log` (one `tail` each, labelled
/// `server/service`); under systemd, to the journal (one `journalctl` over rigger's units).
fn log_jobs(
    server: &Server,
    service: Option<&str>,
    lines: u32,
    follow: bool,
) -> Vec<(String, Job)> {
    match server.layout.service_manager {
        ServiceManager::Rigger => {
            let mut names = service_logs(&server.layout.log_dir);
            if let Some(service) = service {
                names.retain(|name| name == service);
            }
            names
                .into_iter()
                .map(|name| {
                    let file = server.layout.service_log(&name);
                    let tail = Command::new("tail")
                        .args(["-n", &lines.to_string()])
                        .args(follow.then_some("-F"))
                        .arg(file.display().to_string());
                    (format!("{}/{name}", server.id), Job::new(tail))
                })
                .collect()
        }
        ServiceManager::Systemd => {
            let unit = service.map_or_else(|| "rigger-*".to_owned(), rigger_recipes::unit_name);
            let journal = Command::new("journalctl")
                .args(["--no-hostname", "--no-pager", "-o", "short-iso"])
                .args(["-n", &lines.to_string()])
                .args(follow.then_some("-f"))
                .args(["-u", &unit])
                .user("root");
            vec![(server.id.clone(), Job::new(journal))]
        }
    }
}

/// The services with a log in `log_dir` (`<service>.log`; `steps.log` is the recipes' steps).
fn service_logs(log_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(log_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let service = name.strip_suffix(".log")?;
            (service != "steps" && entry.path().is_file()).then(|| service.to_owned())
        })
        .collect();
    names.sort();
    names
}

fn local_services(servers: &[&Server]) -> Vec<String> {
    let mut names: Vec<String> = servers
        .iter()
        .filter(|s| s.layout.service_manager == ServiceManager::Rigger)
        .flat_map(|s| service_logs(&s.layout.log_dir))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// What `rigger exec --list` prints: one line per server, its id, roles, state and how it is
/// reached.
fn listing(servers: &[&Server]) -> String {
    let width = |f: fn(&Server) -> usize| servers.iter().map(|s| f(s)).max().unwrap_or(0);
    let id_width = width(|s| s.id.len());
    let roles_width = width(|s| s.roles.join(",").len());
    let state_width = width(|s| s.state.len());
    servers
        .iter()
        .map(|s| {
            format!(
                "{:id_width$}  {:roles_width$}  {:state_width$}  {}\n",
                s.id,
                s.roles.join(","),
                s.state,
                s.transport.describe()
            )
        })
        .collect()
}

/// Prints each line prefixed by its server, stdout to stdout and stderr to stderr.
struct Printer {
    width: usize,
}

impl Reporter for Printer {
    fn line(&self, label: &str, stream: Stream, line: &str) {
        let text = fanout::prefixed(label, self.width, line);
        // One write per line, so lines of different servers never mix.
        let _ = match stream {
            Stream::Stdout => writeln!(std::io::stdout().lock(), "{text}"),
            Stream::Stderr => writeln!(std::io::stderr().lock(), "{text}"),
        };
    }
}

fn run_tasks(tasks: Vec<Task>, parallel: usize) -> Result<Vec<fanout::Outcome>, Failure> {
    let width = tasks.iter().map(|t| t.label.len()).max().unwrap_or(0);
    let printer: Arc<dyn Reporter> = Arc::new(Printer { width });
    Ok(runtime()?.block_on(fanout::run(tasks, parallel, printer)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rigger_recipes::Layout;
    use rigger_transport::ssh::{SshSettings, SshTarget};

    use crate::fleet::ssh_server;
    use crate::fleet::tests::roles;

    #[test]
    fn exec_runs_the_words_as_one_shell_line() {
        assert_eq!(
            exec_job("echo $HOSTNAME; uptime").command.to_string(),
            "/bin/sh -c 'echo $HOSTNAME; uptime'"
        );
    }

    #[test]
    fn manage_on_a_systemd_host_runs_as_the_app() {
        let layout = Layout::systemd("surveys");
        let job = manage_job(&layout, &["migrate".into(), "--plan".into()]);
        assert_eq!(
            rigger_transport::wrap::remote_line(&job, "admin"),
            r#"cd /srv/surveys/app && exec sudo -n -H -u www-data -- env HOME=/var/lib/rigger/home/www-data PYTHONUNBUFFERED=1 /bin/sh -c 'set -a && . "$1" && set +a && shift && exec "$@"' rigger-env /etc/rigger/app/app.env /srv/surveys/venv/bin/python manage.py migrate --plan"#
        );
    }

    #[test]
    fn manage_on_a_local_server_uses_its_own_files() {
        let mut layout = Layout::local(
            "/var/lib/rigger/s/local/servers/worker-1",
            "/var/lib/rigger/s/local/shared",
        );
        layout.app_dir = "/var/lib/rigger/s/local/releases/initial".into();
        layout.venv_dir = "/var/lib/rigger/venvs/0123".into();
        let job = manage_job(&layout, &["check".into()]);
        let command = rigger_transport::wrap::local_command(&job, "root");
        assert_eq!(
            command.to_string(),
            r#"HOME=/var/lib/rigger/s/local/servers/worker-1/home/www-data PYTHONUNBUFFERED=1 /usr/bin/setpriv --reuid=www-data --regid=www-data --init-groups -- /bin/sh -c 'set -a && . "$1" && set +a && shift && exec "$@"' rigger-env /var/lib/rigger/s/local/servers/worker-1/etc/app/app.env /var/lib/rigger/venvs/0123/bin/python manage.py check"#
        );
        assert_eq!(
            command.cwd.as_deref(),
            Some(Path::new("/var/lib/rigger/s/local/releases/initial"))
        );
    }

    fn ssh_web_server() -> Server {
        let settings = Arc::new(SshSettings::new("/tmp/kh", "/tmp/cm"));
        ssh_server(
            "surveys",
            "web-1",
            roles(&["web"]),
            "in_service",
            SshTarget::new("203.0.113.7", "admin"),
            settings,
        )
    }

    fn jobs_text(jobs: &[(String, Job)]) -> Vec<String> {
        jobs.iter()
            .map(|(label, job)| {
                format!(
                    "{label}: {}",
                    rigger_transport::wrap::remote_line(job, "admin")
                )
            })
            .collect()
    }

    #[test]
    fn logs_on_a_systemd_host_read_the_journal_of_rigger_units() {
        let server = ssh_web_server();
        assert_eq!(
            jobs_text(&log_jobs(&server, None, 10, true)),
            [
                "web-1: exec sudo -n -H -u root -- journalctl --no-hostname --no-pager -o short-iso -n 10 -f -u 'rigger-*'"
            ]
        );
        assert_eq!(
            jobs_text(&log_jobs(&server, Some("nginx"), 50, false)),
            [
                "web-1: exec sudo -n -H -u root -- journalctl --no-hostname --no-pager -o short-iso -n 50 -u rigger-nginx.service"
            ]
        );
    }

    #[test]
    fn logs_on_a_local_server_tail_each_service_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("web-1/log");
        std::fs::create_dir_all(log.join("nginx")).unwrap();
        for name in ["nginx.log", "gunicorn.log", "steps.log", "notes.txt"] {
            std::fs::write(log.join(name), "").unwrap();
        }
        let server = Server {
            layout: Layout::local(dir.path().join("web-1"), dir.path().join("shared")),
            ..ssh_web_server()
        };
        let d = dir.path().display();
        assert_eq!(
            jobs_text(&log_jobs(&server, None, 5, true)),
            [
                format!("web-1/gunicorn: exec tail -n 5 -F {d}/web-1/log/gunicorn.log"),
                format!("web-1/nginx: exec tail -n 5 -F {d}/web-1/log/nginx.log"),
            ]
        );
        assert_eq!(log_jobs(&server, Some("redis"), 5, false).len(), 0);
    }
}
