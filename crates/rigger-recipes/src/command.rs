//! [`Command`]: a program to run, as data.
//!
//! Recipes never run anything. They build `Command` values; a provider runs them (the local
//! provider with `std::process`, the AWS provider by writing them into user-data or systemd
//! units). Tests compare a command's [`Display`](std::fmt::Display), a shell-quoted line.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

/// The script that loads an environment file (`$1`) and then runs the rest of its arguments.
/// `set -a` exports every variable the file sets; rigger writes these files in a syntax that
/// a POSIX shell reads exactly as systemd's `EnvironmentFile=` does.
pub const ENV_FILE_SCRIPT: &str = r#"set -a && . "$1" && set +a && shift && exec "$@""#;

/// A program with its arguments, environment, working directory and user.
///
/// Invariant: no secret value appears in `program`, `args` or `env`. Secrets reach processes
/// through files of mode 0600 (an `EnvironmentFile`, a passfile, a config file) whose path is
/// given instead; the crate's tests check every command of every recipe for this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Command {
    /// Absolute path of the executable (recipes take them from [`crate::Binaries`]).
    pub program: String,
    pub args: Vec<String>,
    /// Variables added to the environment the runner provides.
    pub env: BTreeMap<String, String>,
    /// Working directory; `None` means the runner's choice.
    pub cwd: Option<PathBuf>,
    /// User to run as; `None` means the runner's own user (root for both providers).
    /// Always `None` in a [`crate::ServiceSpec`]'s command, whose user is the service's.
    pub user: Option<String>,
}

impl Command {
    pub fn new(program: impl Into<String>) -> Command {
        Command {
            program: program.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            cwd: None,
            user: None,
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Command {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Command {
        self.env.insert(key.into(), value.into());
        self
    }

    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Command {
        self.cwd = Some(dir.into());
        self
    }

    pub fn user(mut self, user: impl Into<String>) -> Command {
        self.user = Some(user.into());
        self
    }

    /// This command behind a loader that reads `env_file` (`KEY=value` lines, see
    /// [`crate::envfile`]) into its environment, in the process that runs it: `/bin/sh -c
    /// LOADER rigger-env FILE PROGRAM ARGS...`. The values stay in the file (mode 0600, the
    /// user's), so they are never on a command line, in a logged command or in an error.
    /// The loader runs as the command's `user`, so nobody else's file is ever sourced.
    pub fn with_env_file(self, env_file: impl Into<PathBuf>) -> Command {
        let env_file: PathBuf = env_file.into();
        let mut args = vec![
            "-c".to_owned(),
            ENV_FILE_SCRIPT.to_owned(),
            "rigger-env".to_owned(),
            env_file.display().to_string(),
            self.program,
        ];
        args.extend(self.args);
        Command {
            program: "/bin/sh".to_owned(),
            args,
            ..self
        }
    }

    /// Every word of the command line: `program` then `args`.
    pub fn argv(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.program.as_str()).chain(self.args.iter().map(String::as_str))
    }
}

/// `VAR=value ... program arg ...`, each word quoted for a POSIX shell when it needs it.
/// The working directory and user are not part of the line (the runner applies them).
impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (key, value) in &self.env {
            write!(f, "{key}={} ", shell_quote(value))?;
        }
        let mut first = true;
        for word in self.argv() {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            f.write_str(&shell_quote(word))?;
        }
        Ok(())
    }
}

/// Quotes `word` for a POSIX shell: unchanged when it only has characters that are never
/// special, otherwise in single quotes (a `'` inside becomes `'\''`).
pub fn shell_quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-+=/.,:@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_words_that_need_it() {
        let command = Command::new("/usr/bin/env")
            .args(["plain", "two words", "", "it's", "a=b,c:d/e"])
            .env("HOME", "/home/x y");
        assert_eq!(
            command.to_string(),
            r"HOME='/home/x y' /usr/bin/env plain 'two words' '' 'it'\''s' a=b,c:d/e"
        );
    }

    #[test]
    fn with_env_file_loads_the_file_in_the_process_and_keeps_values_off_the_line() {
        let command = Command::new("/srv/venv/bin/python")
            .args(["manage.py", "migrate"])
            .user("www-data")
            .cwd("/srv/app")
            .with_env_file("/srv/app.env");
        assert_eq!(
            command.to_string(),
            r#"/bin/sh -c 'set -a && . "$1" && set +a && shift && exec "$@"' rigger-env /srv/app.env /srv/venv/bin/python manage.py migrate"#
        );
        assert_eq!(command.user.as_deref(), Some("www-data"));
        assert_eq!(
            command.cwd.as_deref(),
            Some(std::path::Path::new("/srv/app"))
        );
    }

    #[test]
    fn shell_quote_handles_shell_metacharacters() {
        for word in ["$HOME", "a;b", "*", "~", "a b", "`x`", "\\", "{1,2}", "#"] {
            assert!(shell_quote(word).starts_with('\''), "{word}");
        }
    }
}
