//! Shell lines that operate a running server of the systemd layout (AWS), as rigger sends
//! them over SSH, as root: maintenance mode on a web server, the warm shutdown of an old
//! worker, and the evidence rigger collects from a server that failed its health check. Pure
//! functions of the [`Layout`], tested by comparing text and by `sh -n`.

use std::time::Duration;

use crate::{Layout, shell_quote, unit_name};

/// The page every web server answers 503 with in maintenance mode, unless the app's release
/// has its own `maintenance.html` at its root.
pub const DEFAULT_MAINTENANCE_PAGE: &str = "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Down for maintenance</title></head>\n<body><h1>Down for maintenance</h1><p>We'll be back shortly.</p></body></html>\n";

/// Turns maintenance mode on or off on a web server: on writes `maintenance.html` into the
/// layout's maintenance directory (nginx answers 503 with it while it exists; the health path
/// is not affected), copied from the app's release when it has one; off removes it. The page
/// appears whole (written beside, then renamed), and both directions may be repeated.
pub fn maintenance_line(layout: &Layout, on: bool) -> String {
    let dir = shell_quote(&layout.maintenance_dir.display().to_string());
    if !on {
        return format!("rm -f {dir}/maintenance.html");
    }
    let app_page = shell_quote(
        &layout
            .app_dir
            .join("maintenance.html")
            .display()
            .to_string(),
    );
    format!(
        "set -e; mkdir -p {dir}; chmod 755 {dir}; \
         if [ -f {app_page} ]; then cp {app_page} {dir}/.maintenance.html.tmp; \
         else printf '%s' {default} > {dir}/.maintenance.html.tmp; fi; \
         chmod 644 {dir}/.maintenance.html.tmp; mv -f {dir}/.maintenance.html.tmp {dir}/maintenance.html",
        default = shell_quote(DEFAULT_MAINTENANCE_PAGE),
    )
}

/// Stops Celery on an old worker with a warm shutdown: beat first (no new scheduled tasks),
/// then the worker with SIGTERM (its unit's stop signal), which stops taking tasks and lets
/// the running ones finish. systemd waits `timeout` (a runtime drop-in overrides the unit's
/// `TimeoutStopSec` for this stop only, under /run) before it kills what is left.
pub fn warm_stop_workers_line(timeout: Duration) -> String {
    let worker = unit_name("celery-worker");
    let dropin = shell_quote(&format!("/run/systemd/system/{worker}.d"));
    format!(
        "set -e; mkdir -p {dropin}; printf '[Service]\\nTimeoutStopSec=%s\\n' {secs} > {dropin}/rigger-warm-stop.conf; \
         systemctl daemon-reload; systemctl stop {beat} {worker}; \
         rm -f {dropin}/rigger-warm-stop.conf; systemctl daemon-reload",
        secs = timeout.as_secs(),
        beat = shell_quote(&unit_name("celery-beat")),
        worker = shell_quote(&worker),
    )
}

/// What rigger quotes when a new web server fails its health check: the health path as the
/// load balancer asks it (HTTPS on the server's own address, any certificate), with status
/// and the start of the body, then the last lines of the app's log from the journal.
///
/// rigger.toml's validation allows only plain characters in the health path; the line quotes
/// it all the same (and turns off curl's URL globbing), as every value a shell line takes.
pub fn health_evidence_line(health_path: &str, lines: u32) -> String {
    format!(
        "address=$(hostname -I | cut -d' ' -f1); \
         body=$(mktemp); \
         code=$(curl -gsk -m 5 -o \"$body\" -w '%{{http_code}}' \"https://$address\"{path} || true); \
         printf 'GET %s answered %s: %s\\n' {path} \"${{code:-nothing}}\" \"$(head -c 300 \"$body\" | tr '\\n' ' ')\"; \
         rm -f \"$body\"; \
         echo \"last lines of the app's log:\"; \
         journalctl --no-pager -o cat -n {lines} -u {gunicorn} -u {worker} | sed 's/^/    /'",
        path = shell_quote(health_path),
        gunicorn = shell_quote(&unit_name("gunicorn")),
        worker = shell_quote(&unit_name("celery-worker")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh_n(line: &str) {
        let status = std::process::Command::new("sh")
            .args(["-n", "-c", line])
            .status()
            .unwrap();
        assert!(status.success(), "sh -n rejects: {line}");
    }

    /// A hostile health path reaches the shell as one quoted word: the command substitution,
    /// the `;`, the quote and the newline in it run nothing, and curl is asked for the path as
    /// written (stand-ins for `hostname`, `curl` and `journalctl` record what they are given).
    #[test]
    fn health_evidence_quotes_a_hostile_path() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let pwned = dir.path().join("pwned");
        let curl_args = dir.path().join("curl.args");
        for (name, body) in [
            ("hostname", "echo 192.0.2.10".to_owned()),
            (
                "curl",
                format!(
                    "printf '%s\\n' \"$@\" > {}; echo 500",
                    shell_quote(&curl_args.display().to_string())
                ),
            ),
            ("journalctl", "echo app log line".to_owned()),
        ] {
            let path = bin.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let touch = format!("touch {}", pwned.display());
        let hostile = format!("/$({touch})`{touch}`;{touch};'\"\n{touch}");
        let line = health_evidence_line(&hostile, 5);
        sh_n(&line);
        let output = std::process::Command::new("sh")
            .args(["-c", &line])
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{output:?}");
        assert!(!pwned.exists(), "the health path ran a command: {line}");
        let args = std::fs::read_to_string(&curl_args).unwrap();
        assert!(
            args.contains(&format!("\nhttps://192.0.2.10{hostile}\n")),
            "{args}"
        );
        assert!(
            stdout.starts_with(&format!("GET {hostile} answered 500")),
            "{stdout}"
        );
        assert!(stdout.contains("    app log line"), "{stdout}");
    }

    #[test]
    fn maintenance_lines_write_the_page_whole_and_remove_it() {
        let layout = Layout::systemd("shop");
        let on = maintenance_line(&layout, true);
        assert!(
            on.contains("mv -f /var/lib/rigger/maintenance/.maintenance.html.tmp /var/lib/rigger/maintenance/maintenance.html"),
            "{on}"
        );
        assert!(on.contains("Down for maintenance"), "{on}");
        sh_n(&on);
        assert_eq!(
            maintenance_line(&layout, false),
            "rm -f /var/lib/rigger/maintenance/maintenance.html"
        );
    }

    #[test]
    fn maintenance_on_writes_the_app_page_or_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let mut layout = Layout::systemd("shop");
        layout.maintenance_dir = dir.path().join("maintenance");
        layout.app_dir = dir.path().join("app");
        let run = |line: &str| {
            let status = std::process::Command::new("sh")
                .args(["-c", line])
                .status()
                .unwrap();
            assert!(status.success(), "{line}");
        };
        let page = layout.maintenance_dir.join("maintenance.html");
        run(&maintenance_line(&layout, true));
        assert_eq!(
            std::fs::read_to_string(&page).unwrap(),
            DEFAULT_MAINTENANCE_PAGE
        );
        std::fs::create_dir_all(&layout.app_dir).unwrap();
        std::fs::write(layout.app_dir.join("maintenance.html"), "<p>ours</p>").unwrap();
        run(&maintenance_line(&layout, true));
        assert_eq!(std::fs::read_to_string(&page).unwrap(), "<p>ours</p>");
        run(&maintenance_line(&layout, false));
        run(&maintenance_line(&layout, false));
        assert!(!page.exists());
    }

    #[test]
    fn warm_stop_uses_the_deploys_timeout() {
        let line = warm_stop_workers_line(Duration::from_secs(900));
        assert!(line.contains("TimeoutStopSec=%s\\n' 900"), "{line}");
        assert!(
            line.contains("systemctl stop rigger-celery-beat.service rigger-celery-worker.service"),
            "{line}"
        );
        sh_n(&line);
    }

    #[test]
    fn health_evidence_probes_the_health_path_and_reads_the_journal() {
        let line = health_evidence_line("/healthcheck.html", 20);
        assert!(
            line.contains("\"https://$address\"/healthcheck.html"),
            "{line}"
        );
        assert!(line.contains("-u rigger-gunicorn.service"), "{line}");
        sh_n(&line);
    }
}
