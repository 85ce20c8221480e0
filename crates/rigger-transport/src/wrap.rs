//! A [`Job`] as the exact command each transport runs: pure functions, tested by comparing
//! text.
//!
//! Both transports do the same three things around the job's command, in this order: switch
//! to the job's user (`setpriv` as root, `sudo` otherwise), add the job's variables (`env`),
//! and load the environment file as that user (`sh -c 'set -a && . FILE ...'`), so a secret in
//! the file is read on the server by the user entitled to it and never travels on a command
//! line. [`local_command`] returns a command for this machine (its working directory is set
//! by the process builder); [`remote_line`] returns the shell line that `ssh` sends, which
//! changes directory itself.

use std::path::Path;

use rigger_recipes::{Command, shell_quote};

use crate::Job;

pub use rigger_recipes::ENV_FILE_SCRIPT;

/// Where `setpriv` is: util-linux, on every Debian system.
pub const SETPRIV: &str = "/usr/bin/setpriv";

/// The command that runs `job` on this machine when rigger runs as `current_user`: the job's
/// own command when no user switch or environment file is needed, otherwise wrapped in
/// `setpriv` and/or `sh -c`. The job's variables and working directory are kept on the
/// returned command for the process builder to apply.
pub fn local_command(job: &Job, current_user: &str) -> Command {
    let mut words = inner_words(job);
    if let Some(user) = job.command.user.as_deref()
        && user != current_user
    {
        words.splice(0..0, setpriv_words(user));
    }
    let mut words = words.into_iter();
    let program = words.next().expect("a command has a program");
    let mut command = Command::new(program).args(words);
    command.env = job.command.env.clone();
    command.cwd = job.command.cwd.clone();
    command
}

/// The shell line that runs `job` on a server where `login_user` is logged in (what `ssh`
/// passes to the login shell): `cd DIR && exec [USER SWITCH] [env VAR=value ...]
/// [sh -c LOAD FILE] PROGRAM ARGS...`, every word quoted.
pub fn remote_line(job: &Job, login_user: &str) -> String {
    let command = &job.command;
    let mut words: Vec<String> = Vec::new();
    if let Some(user) = command.user.as_deref()
        && user != login_user
    {
        if login_user == "root" {
            words.extend(setpriv_words(user));
        } else {
            words.extend(["sudo", "-n", "-H", "-u", user, "--"].map(String::from));
        }
    }
    if !command.env.is_empty() {
        words.push("env".into());
        words.extend(
            command
                .env
                .iter()
                .map(|(key, value)| format!("{key}={value}")),
        );
    }
    words.extend(inner_words(job));
    let line = words
        .iter()
        .map(|word| shell_quote(word))
        .collect::<Vec<_>>()
        .join(" ");
    match &command.cwd {
        Some(dir) => format!("cd {} && exec {line}", quote_path(dir)),
        None => format!("exec {line}"),
    }
}

/// The shell line that writes its standard input to `destination` with `mode`, atomically:
/// a temporary file beside it (created private), then a rename.
pub fn copy_line(destination: &Path, mode: u32) -> String {
    let destination = destination.display().to_string();
    let temporary = shell_quote(&format!("{destination}.rigger-tmp"));
    format!(
        "umask 077 && cat > {temporary} && chmod {mode:04o} {temporary} && mv -f {temporary} {}",
        shell_quote(&destination)
    )
}

/// The program and arguments, behind the environment file loader when there is one.
fn inner_words(job: &Job) -> Vec<String> {
    let bare = Command {
        env: Default::default(),
        ..job.command.clone()
    };
    let loaded = match &job.env_file {
        Some(env_file) => bare.with_env_file(env_file),
        None => bare,
    };
    loaded.argv().map(str::to_owned).collect()
}

fn setpriv_words(user: &str) -> Vec<String> {
    vec![
        SETPRIV.to_owned(),
        format!("--reuid={user}"),
        format!("--regid={user}"),
        "--init-groups".to_owned(),
        "--".to_owned(),
    ]
}

fn quote_path(path: &Path) -> String {
    shell_quote(&path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manage() -> Job {
        Job::new(
            Command::new("/srv/site/venv/bin/python")
                .args(["manage.py", "showmigrations"])
                .cwd("/srv/site/app")
                .user("www-data")
                .env("HOME", "/var/lib/rigger/home/www-data"),
        )
        .env_file("/etc/rigger/app/app.env")
    }

    #[test]
    fn local_command_runs_a_plain_job_as_it_is() {
        let job = Job::new(Command::new("/bin/sh").args(["-c", "uptime"]));
        assert_eq!(local_command(&job, "root").to_string(), "/bin/sh -c uptime");
    }

    #[test]
    fn local_command_switches_user_then_loads_the_env_file() {
        let command = local_command(&manage(), "root");
        assert_eq!(
            command.to_string(),
            r#"HOME=/var/lib/rigger/home/www-data /usr/bin/setpriv --reuid=www-data --regid=www-data --init-groups -- /bin/sh -c 'set -a && . "$1" && set +a && shift && exec "$@"' rigger-env /etc/rigger/app/app.env /srv/site/venv/bin/python manage.py showmigrations"#
        );
        assert_eq!(command.cwd.as_deref(), Some(Path::new("/srv/site/app")));
    }

    #[test]
    fn local_command_does_not_switch_to_the_current_user() {
        let job = Job::new(Command::new("/usr/bin/id").user("root"));
        assert_eq!(local_command(&job, "root").to_string(), "/usr/bin/id");
    }

    #[test]
    fn remote_line_as_root_uses_setpriv() {
        assert_eq!(
            remote_line(&manage(), "root"),
            r#"cd /srv/site/app && exec /usr/bin/setpriv --reuid=www-data --regid=www-data --init-groups -- env HOME=/var/lib/rigger/home/www-data /bin/sh -c 'set -a && . "$1" && set +a && shift && exec "$@"' rigger-env /etc/rigger/app/app.env /srv/site/venv/bin/python manage.py showmigrations"#
        );
    }

    #[test]
    fn remote_line_as_the_deploy_user_uses_sudo_without_a_password_prompt() {
        assert_eq!(
            remote_line(&manage(), "admin"),
            r#"cd /srv/site/app && exec sudo -n -H -u www-data -- env HOME=/var/lib/rigger/home/www-data /bin/sh -c 'set -a && . "$1" && set +a && shift && exec "$@"' rigger-env /etc/rigger/app/app.env /srv/site/venv/bin/python manage.py showmigrations"#
        );
    }

    #[test]
    fn remote_line_quotes_a_shell_command_once() {
        let job = Job::new(Command::new("/bin/sh").args(["-c", "echo $HOSTNAME; exit 3"]));
        assert_eq!(
            remote_line(&job, "admin"),
            "exec /bin/sh -c 'echo $HOSTNAME; exit 3'"
        );
    }

    #[test]
    fn copy_line_writes_privately_then_renames() {
        assert_eq!(
            copy_line(Path::new("/srv/site/release 2.tar"), 0o640),
            "umask 077 && cat > '/srv/site/release 2.tar.rigger-tmp' && chmod 0640 '/srv/site/release 2.tar.rigger-tmp' && mv -f '/srv/site/release 2.tar.rigger-tmp' '/srv/site/release 2.tar'"
        );
    }
}
