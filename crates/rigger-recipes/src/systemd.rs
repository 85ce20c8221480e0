//! systemd units for [`ServiceSpec`]s, for hosts whose layout says
//! [`ServiceManager::Systemd`](crate::ServiceManager::Systemd) (the AWS provider).
//!
//! A unit runs the same foreground command rigger's own supervisor would (`Type=simple`), as
//! the service's user, with its `env_file` as `EnvironmentFile=`. Dependencies become
//! `Requires=` and `After=`. `KillMode=mixed` sends the stop signal to the main process only
//! (nginx, PostgreSQL, Celery and HAProxy stop their own children gracefully) and SIGKILL to
//! whatever is left after `TimeoutStopSec=`. Run directories, emptied at boot, are recreated
//! by a `tmpfiles.d` file per role.
//!
//! A service that stops is restarted ([`RESTART_DELAY`] later) for as long as it keeps
//! failing: `StartLimitIntervalSec=0` turns off systemd's start limit, whose default (5 starts
//! in 10 s) left a service that failed fast (a database not up yet, a full disk) failed for
//! good, on a server nobody watches. The delay keeps a failing service from hammering what
//! it waits for. (Debian 12's systemd 252 has no `RestartSteps=` to grow it.)

use minijinja::context;

use crate::error::RenderError;
use crate::roles::s;
use crate::{FileSpec, Layout, Recipe, Role, ServiceSpec, engine};

/// How long systemd waits before restarting a service that stopped (`RestartSec=`).
pub const RESTART_DELAY: std::time::Duration = std::time::Duration::from_secs(5);

/// The unit's name: `rigger-<service>.service`.
pub fn unit_name(service: &str) -> String {
    format!("rigger-{service}.service")
}

/// The unit file of `service`, in `layout.systemd_unit_dir`.
pub fn systemd_unit(service: &ServiceSpec, layout: &Layout) -> Result<FileSpec, RenderError> {
    let unit = unit_name(&service.name);
    let command = &service.command;
    let exec_start = command
        .argv()
        .map(|w| quote(w, true))
        .collect::<Vec<_>>()
        .join(" ");
    let environment: Vec<String> = command
        .env
        .iter()
        .map(|(k, v)| quote(&format!("{k}={v}"), false))
        .collect();
    let deps: Vec<String> = service.depends_on.iter().map(|d| unit_name(d)).collect();
    let contents = engine::render(
        "systemd.service",
        context! {
            unit => &unit,
            name => &service.name,
            deps,
            user => &service.user,
            cwd => command.cwd.as_deref().map(s),
            environment,
            env_file => service.env_file.as_deref().map(s),
            exec_start,
            kill => s(&layout.bins.kill),
            reload_signal => service.reload_signal.map(|sig| sig.name()),
            stop_signal => service.stop_signal.name(),
            stop_timeout => service.stop_timeout.as_secs(),
            restart_delay => RESTART_DELAY.as_secs(),
        },
    )?;
    Ok(FileSpec {
        path: layout.systemd_unit_dir.join(unit),
        contents,
        mode: 0o644,
        owner: "root".into(),
        contains_secret: false,
    })
}

/// Adds a unit per service of `recipe`, and a `tmpfiles.d` file for its run directories.
pub(crate) fn add_units(
    recipe: &mut Recipe,
    role: Role,
    layout: &Layout,
) -> Result<(), RenderError> {
    let units = recipe
        .services
        .iter()
        .map(|service| systemd_unit(service, layout))
        .collect::<Result<Vec<_>, _>>()?;
    recipe.files.extend(units);

    let lines: Vec<String> = recipe
        .dirs
        .iter()
        .filter(|d| d.path.starts_with(&layout.run_dir))
        .map(|d| {
            format!(
                "d {} {:04o} {} {} -\n",
                s(&d.path),
                d.mode,
                d.owner,
                d.owner
            )
        })
        .collect();
    if !lines.is_empty() {
        recipe.files.push(FileSpec {
            path: layout.tmpfiles_dir.join(format!("rigger-{role}.conf")),
            contents: format!(
                "# Run directories of the {role} role, recreated at boot; rendered by rigger.\n{}",
                lines.concat()
            ),
            mode: 0o644,
            owner: "root".into(),
            contains_secret: false,
        });
    }
    Ok(())
}

/// Quotes a word of a unit's command line or `Environment=` setting: `%` (specifiers) is
/// doubled, and so is `$` in command lines (variable expansion); words with other special
/// characters go in double quotes with `\` and `"` escaped.
fn quote(word: &str, command_line: bool) -> String {
    let mut escaped = word.replace('%', "%%");
    if command_line {
        escaped = escaped.replace('$', "$$");
    }
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-+=/.,:@%$".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        return escaped;
    }
    let mut out = String::from("\"");
    for c in escaped.chars() {
        match c {
            '\\' | '"' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn quoting() {
        assert_eq!(quote("/usr/bin/x", true), "/usr/bin/x");
        assert_eq!(quote("50%", true), "50%%");
        assert_eq!(quote("$HOME", true), "$$HOME");
        assert_eq!(quote("$HOME", false), "$HOME");
        assert_eq!(quote("a b", true), "\"a b\"");
        assert_eq!(quote("-kernel x {1,2}", false), "\"-kernel x {1,2}\"");
        assert_eq!(quote(r#"a"b\c"#, true), r#""a\"b\\c""#);
        assert_eq!(quote("", true), "\"\"");
    }
}
