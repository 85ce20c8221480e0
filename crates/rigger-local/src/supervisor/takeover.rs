//! What a supervisor does with a service a dead supervisor left running: adopt it as it is,
//! adopt it and reload it, or restart it. Decided from data alone (the pid file's digest and
//! the recipe the server last had applied, against the recipe it would start now), so the
//! rules are tested without processes.
//!
//! The rule is "apply in place what the supervisor applies in place": a running server's
//! configuration changes while it runs when a failover repoints it, a replica is added or
//! rebuilt, or the web servers behind the load balancer change; the supervisor then writes
//! the files and reloads the services that read them ([`super::Supervisor::reapply`]). A
//! supervisor killed between recording such a change (the registry) and applying it leaves
//! servers whose configuration is behind; its successor finishes the job the same way instead
//! of restarting them (restarting the new primary's PostgreSQL, or every web server at once,
//! fails requests). What a reload cannot apply (a service's command, user or environment, or
//! a file of a service without a reload signal) restarts that service only.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::paths::EnvPaths;

/// What a successor does with one service left running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Takeover {
    /// Runs exactly what would be started: watched and probed, nothing else.
    Adopt,
    /// Runs what would be started but for files it re-reads on its reload signal: adopted,
    /// then reloaded once the files are written.
    AdoptAndReload,
    /// Stopped and started again.
    Restart,
}

/// The decision for the service named `name` of a server whose recipe is `now` (as JSON),
/// left running with the configuration digest `recorded` (its pid record's) where the
/// configuration now has `digest_now`. `applied` is the recipe the server last had applied (`None`
/// when unknown: written by an older rigger, or lost). `reload_anyway`: the service's files
/// are state that changes with no configuration change (the load balancer's list of web
/// servers): adopted and reloaded whatever they hold.
pub(super) fn decide(
    name: &str,
    recorded: &str,
    digest_now: &str,
    applied: Option<&Value>,
    now: &Value,
    reload_anyway: bool,
) -> Takeover {
    let Some(spec) = service(now, name) else {
        return Takeover::Restart;
    };
    let reloadable = !spec["reload_signal"].is_null();
    if recorded == digest_now {
        return Takeover::Adopt;
    }
    if reload_anyway && reloadable {
        return Takeover::AdoptAndReload;
    }
    let Some(applied) = applied else {
        return Takeover::Restart;
    };
    // The same recipe under another digest: the TLS files changed, which only a start reads
    // (a certificate copied into place by a step).
    if applied == now {
        return Takeover::Restart;
    }
    if service(applied, name) != Some(spec) {
        return Takeover::Restart;
    }
    let changed = changed_files(applied, now);
    let env_file = spec["env_file"].as_str().map(PathBuf::from);
    if env_file
        .as_ref()
        .is_some_and(|env| changed.iter().any(|c| c == env))
    {
        // Its environment is read when it starts, and no reload re-reads it.
        return Takeover::Restart;
    }
    let named = named_paths(spec);
    let its_own = changed.iter().any(|file| reads(&named, file));
    match (its_own, reloadable) {
        (false, _) => Takeover::Adopt,
        (true, true) => Takeover::AdoptAndReload,
        (true, false) => Takeover::Restart,
    }
}

fn service<'a>(recipe: &'a Value, name: &str) -> Option<&'a Value> {
    recipe["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"].as_str() == Some(name))
}

/// The paths of the files that differ between two recipes (added, removed, or with other
/// contents, mode or owner).
fn changed_files(applied: &Value, now: &Value) -> Vec<PathBuf> {
    let files =
        |recipe: &Value| -> Vec<Value> { recipe["files"].as_array().cloned().unwrap_or_default() };
    let (before, after) = (files(applied), files(now));
    let path = |file: &Value| PathBuf::from(file["path"].as_str().unwrap_or_default());
    let mut changed: Vec<PathBuf> = after
        .iter()
        .filter(|file| !before.contains(file))
        .chain(before.iter().filter(|file| !after.contains(file)))
        .map(path)
        .collect();
    changed.sort();
    changed.dedup();
    changed
}

/// Every path a service's command names: its arguments, whole or after `=`
/// (`config_file=/etc/...`), and its program's.
fn named_paths(spec: &Value) -> Vec<PathBuf> {
    let command = &spec["command"];
    command["args"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(std::iter::once(&command["program"]))
        .filter_map(Value::as_str)
        .map(|arg| arg.rsplit_once('=').map_or(arg, |(_, value)| value))
        .filter(|arg| arg.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

/// Whether a service that names `named` reads `file`: one it names, or one beside it (a
/// configuration's includes: PgBouncer's userlist next to its ini, PostgreSQL's pg_hba.conf
/// next to postgresql.conf), or one under a directory it names (nginx's prefix).
fn reads(named: &[PathBuf], file: &Path) -> bool {
    named.iter().any(|path| {
        file == path
            || file.starts_with(path)
            || (path.parent().is_some_and(|dir| file.parent() == Some(dir)))
    })
}

/// A recipe as the take-over compares and records it: every file's contents and every
/// command environment's values replaced by their SHA-256 (they may hold secrets, which a
/// record never does; equal digests are what the comparison needs).
pub(super) fn comparable(recipe: &rigger_recipes::Recipe) -> Value {
    let mut value = serde_json::to_value(recipe).unwrap_or(Value::Null);
    digest_secrets(&mut value);
    value
}

fn digest_secrets(value: &mut Value) {
    use sha2::Digest as _;
    let digest = |text: &str| {
        let hash = sha2::Sha256::digest(text.as_bytes());
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        Value::String(format!("sha256:{hex}"))
    };
    match value {
        Value::Object(map) => {
            for (key, inner) in map.iter_mut() {
                match (key.as_str(), &mut *inner) {
                    ("contents", Value::String(text)) => *inner = digest(text),
                    ("env", Value::Object(env)) => {
                        for text in env.values_mut() {
                            if let Value::String(plain) = text {
                                *text = digest(plain);
                            }
                        }
                    }
                    _ => digest_secrets(inner),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(digest_secrets),
        _ => {}
    }
}

/// Where the recipe a server last had applied is kept: with its digest, what a successor
/// compares against ([`comparable`]: no secret in it). Mode 0600 under the server's
/// directory.
fn applied_path(paths: &EnvPaths, server: &str) -> PathBuf {
    paths.server(server).join("applied-recipe.json")
}

/// The recipe `server` last had applied, if it is known and readable.
pub(super) fn applied(paths: &EnvPaths, server: &str) -> Option<Value> {
    let text = std::fs::read(applied_path(paths, server)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Records `recipe` as the one `server` runs now (beside each service's digest).
pub(super) fn record_applied(paths: &EnvPaths, server: &str, recipe: &Value) {
    let path = applied_path(paths, server);
    let written = serde_json::to_vec(recipe)
        .map_err(std::io::Error::other)
        .and_then(|bytes| crate::files::write_atomically(&path, &bytes));
    if let Err(error) = written {
        tracing::warn!(server, "recording the configuration applied: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn web(stunnel_conf: &str, app_env: &str) -> Value {
        json!({
            "files": [
                {"path": "/s/web-1/etc/stunnel/stunnel.conf", "contents": stunnel_conf, "mode": 384, "owner": "root"},
                {"path": "/s/web-1/etc/app/app.env", "contents": app_env, "mode": 384, "owner": "root"},
                {"path": "/s/web-1/etc/pgbouncer/pgbouncer.ini", "contents": "ini", "mode": 384, "owner": "root"},
                {"path": "/s/web-1/etc/pgbouncer/userlist.txt", "contents": "users", "mode": 384, "owner": "root"},
            ],
            "services": [
                {"name": "stunnel", "command": {"program": "/usr/bin/stunnel4", "args": ["/s/web-1/etc/stunnel/stunnel.conf"]}, "env_file": null, "reload_signal": "HUP"},
                {"name": "pgbouncer", "command": {"program": "/usr/sbin/pgbouncer", "args": ["/s/web-1/etc/pgbouncer/pgbouncer.ini"]}, "env_file": null, "reload_signal": "HUP"},
                {"name": "gunicorn", "command": {"program": "/venv/bin/gunicorn", "args": ["app:wsgi"]}, "env_file": "/s/web-1/etc/app/app.env", "reload_signal": "HUP"},
                {"name": "celery", "command": {"program": "/venv/bin/celery", "args": ["--config=/s/web-1/etc/stunnel/stunnel.conf"]}, "env_file": null, "reload_signal": null},
            ],
            "steps": [],
        })
    }

    #[test]
    fn an_unchanged_service_is_adopted() {
        let now = web("primary A", "env");
        assert_eq!(
            decide("gunicorn", "d", "d", None, &now, false),
            Takeover::Adopt
        );
    }

    #[test]
    fn a_repointed_tunnel_is_reloaded_and_its_neighbours_adopted() {
        // A failover changed stunnel.conf only: stunnel reloads; PgBouncer and the app, which
        // do not read it, keep running untouched.
        let (applied, now) = (web("primary A", "env"), web("primary B", "env"));
        let decide = |name| decide(name, "old", "new", Some(&applied), &now, false);
        assert_eq!(decide("stunnel"), Takeover::AdoptAndReload);
        assert_eq!(decide("pgbouncer"), Takeover::Adopt);
        assert_eq!(decide("gunicorn"), Takeover::Adopt);
        // A service that reads the file and has no reload signal is restarted.
        assert_eq!(decide("celery"), Takeover::Restart);
    }

    #[test]
    fn a_changed_environment_restarts_its_service_only() {
        let (applied, now) = (web("primary A", "env 1"), web("primary A", "env 2"));
        let decide = |name| decide(name, "old", "new", Some(&applied), &now, false);
        assert_eq!(decide("gunicorn"), Takeover::Restart);
        assert_eq!(decide("stunnel"), Takeover::Adopt);
    }

    #[test]
    fn a_file_beside_the_one_a_service_names_is_its_own() {
        let applied = web("primary A", "env");
        let mut now = applied.clone();
        now["files"][3]["contents"] = json!("other users");
        assert_eq!(
            decide("pgbouncer", "old", "new", Some(&applied), &now, false),
            Takeover::AdoptAndReload
        );
    }

    #[test]
    fn a_changed_command_or_an_unknown_past_restarts() {
        let applied = web("primary A", "env");
        let mut now = applied.clone();
        now["services"][0]["command"]["args"] = json!(["-v", "/s/web-1/etc/stunnel/stunnel.conf"]);
        assert_eq!(
            decide("stunnel", "old", "new", Some(&applied), &now, false),
            Takeover::Restart
        );
        assert_eq!(
            decide("stunnel", "old", "new", None, &applied, false),
            Takeover::Restart
        );
        // The same recipe under another digest: the TLS files changed.
        assert_eq!(
            decide("stunnel", "old", "new", Some(&applied), &applied, false),
            Takeover::Restart
        );
    }

    #[test]
    fn the_recorded_recipe_holds_digests_of_contents_and_environments_not_them() {
        let mut recipe = rigger_recipes::Recipe::default();
        recipe.files.push(rigger_recipes::FileSpec {
            path: "/s/web-1/etc/app/app.env".into(),
            contents: "SECRET_KEY=hunter2\n".into(),
            mode: 0o600,
            owner: "root".into(),
            contains_secret: true,
        });
        let mut step = rigger_recipes::Command::new("/usr/bin/psql");
        step.env.insert("PGPASSWORD".into(), "hunter3".into());
        recipe.steps.push(rigger_recipes::StepSpec {
            name: "setup".into(),
            command: step,
            phase: rigger_recipes::Phase::AfterStart,
            creates: None,
            stdin_file: None,
            retry: None,
        });
        let recorded = comparable(&recipe);
        let text = recorded.to_string();
        assert!(
            !text.contains("hunter2") && !text.contains("hunter3"),
            "{text}"
        );
        assert!(text.contains("/s/web-1/etc/app/app.env"), "{text}");
        // Other contents, another digest: a change is still seen.
        recipe.files[0].contents = "SECRET_KEY=hunter4\n".into();
        assert_ne!(comparable(&recipe), recorded);
    }

    #[test]
    fn state_files_are_reloaded_whatever_they_hold() {
        let now = web("primary A", "env");
        assert_eq!(
            decide("stunnel", "old", "new", None, &now, true),
            Takeover::AdoptAndReload
        );
        assert_eq!(
            decide("celery", "old", "new", None, &now, true),
            Takeover::Restart
        );
    }
}
