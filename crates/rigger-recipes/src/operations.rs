//! Shell lines that operate a running server of the systemd layout (AWS), as rigger sends
//! them over SSH, as root: maintenance mode on a web server, the warm shutdown of an old
//! worker, the evidence rigger collects from a server that failed its health check, and
//! PgBouncer's admin console during a failover (a pause that ends by itself at a deadline).
//! Pure functions of the [`Layout`], tested by comparing text and by `sh -n`; the failover's
//! deadline figures are shared with the local provider.

use std::path::Path;
use std::time::Duration;

use crate::{Command, Layout, shell_quote, unit_name};

/// How long a failover may hold PgBouncer paused: before pausing a pool, rigger arms a
/// deadline on the server's side (a systemd timer on AWS, a detached helper process locally)
/// that sends `RESUME` by itself, so a rigger killed between `PAUSE` and `RESUME` never leaves
/// the site waiting for ever. A planned failover's pause normally lasts seconds: pausing (each
/// `PAUSE` waits for running transactions), the replica catching up (15 s at most), promoting
/// (30 s at most), fencing and repointing; 120 s covers them with room to spare.
pub const PAUSE_DEADLINE: Duration = Duration::from_secs(120);

/// The least time a failover must have left on its pause deadline to go past its point of no
/// return (promoting the replica, then fencing the old primary): promoting waits up to 30 s,
/// fencing takes seconds. With less left, rigger gives up and resumes, changing nothing, so a
/// deadline can never resume clients onto an old primary that still accepts writes; a deadline
/// that fires after fencing only sends them to a stopped primary (errors, never lost writes)
/// until they are repointed.
pub const PROMOTE_BUDGET: Duration = Duration::from_secs(60);

/// The transient systemd unit (a `.timer` and its `.service`) that resumes PgBouncer at the
/// failover's deadline on a server.
pub const PGBOUNCER_RESUME_UNIT: &str = "rigger-pgbouncer-resume";

/// Where the deadline's script lives on a server: root's own directory under `/run` (a tmpfs,
/// gone at reboot, when PgBouncer restarts unpaused anyway).
const PGBOUNCER_RESUME_DIR: &str = "/run/rigger-failover";

/// The page every web server answers 503 with in maintenance mode, unless the app's release
/// has its own `maintenance.html` at its root.
pub const DEFAULT_MAINTENANCE_PAGE: &str = "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Down for maintenance</title></head>\n<body><h1>Down for maintenance</h1><p>We'll be back shortly.</p></body></html>\n";

/// `/bin/sh -c LINE` as root: how a shell line of this module runs on a server (the deploy
/// user's sudo on AWS; the local transport runs as rigger's user, root).
pub fn root_shell(line: &str) -> Command {
    Command::new("/bin/sh")
        .args(["-c", line])
        .user("root".to_owned())
}

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

/// A PostgreSQL program of the layout's, run as the postgres user with `HOME` set to that
/// user's home in the layout: libpq reads `~/.postgresql` (client certificates) and the
/// runner's own `HOME` (root's) is not readable by postgres.
pub fn postgres_program(layout: &Layout, program: &str) -> Command {
    let pg = &layout.users.postgres;
    Command::new(
        layout
            .bins
            .postgres_bin_dir
            .join(program)
            .display()
            .to_string(),
    )
    .env("HOME", layout.home(pg).display().to_string())
    .user(pg.clone())
}

/// `-h SOCKET -p 5432 -U postgres -d DB`: the database server's own socket, as its superuser.
fn over_the_socket(layout: &Layout, command: Command, db: &str) -> Command {
    command
        .arg("-h")
        .arg(layout.run("postgresql").display().to_string())
        .args(["-p", "5432", "-U", &layout.users.postgres, "-d", db])
}

/// One SQL statement as the postgres superuser over a database server's socket: rows
/// `|`-separated without headers, stopping at the first error. Both providers query their
/// database servers with it (over their transport).
pub fn psql(layout: &Layout, sql: &str) -> Command {
    over_the_socket(
        layout,
        postgres_program(layout, "psql").args(["-XAtq", "-F", "|", "-v", "ON_ERROR_STOP=1"]),
        "postgres",
    )
    .args(["-c", sql])
}

/// A custom-format `pg_dump` of database `db` into `file` on the database server (a path the
/// postgres user may write).
pub fn pg_dump(layout: &Layout, db: &str, file: &Path) -> Command {
    over_the_socket(layout, postgres_program(layout, "pg_dump").arg("-Fc"), db)
        .arg("-f")
        .arg(file.display().to_string())
}

/// `pg_restore` of the backup `file` (on the database server, readable by postgres) over
/// database `db`, with [`pg_restore_options`].
pub fn pg_restore(layout: &Layout, db: &str, file: &Path) -> Command {
    over_the_socket(
        layout,
        postgres_program(layout, "pg_restore").args(pg_restore_options(db)),
        db,
    )
    .arg(file.display().to_string())
}

/// `pg_restore`'s options for restoring a backup over the app's database `db`: objects
/// dropped and made again, owned by the app's role, all in one transaction, so that a restore
/// that fails half-way (a backup cut short, a full disk) leaves the database as it was rather
/// than half-dropped. Every provider's restore uses these.
pub fn pg_restore_options(db: &str) -> Vec<String> {
    [
        "--clean",
        "--if-exists",
        "--no-owner",
        "--single-transaction",
        "--role",
        db,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// `psql` on PgBouncer's admin console as rigger's admin user, running `commands` (`PAUSE`,
/// `SHOW POOLS`) in one session, rows `|`-separated. The credentials come from the variables of
/// the root-only admin file the recipe writes ([`crate::pgbouncer_admin_env`], loaded into the
/// job's environment; never on a command line).
pub fn pgbouncer_admin_line(commands: &[&str]) -> String {
    let commands: Vec<String> = commands
        .iter()
        .map(|c| format!("-c {}", shell_quote(c)))
        .collect();
    format!(
        "PGPASSWORD=\"$PGBOUNCER_ADMIN_PASSWORD\" PGCONNECT_TIMEOUT=5 psql \"host=$PGBOUNCER_HOST port=$PGBOUNCER_PORT dbname=pgbouncer user=$PGBOUNCER_ADMIN_USER sslmode=disable\" -XAtq -F '|' {}",
        commands.join(" ")
    )
}

/// Pauses PgBouncer with a deadline: first a transient systemd timer
/// ([`PGBOUNCER_RESUME_UNIT`], replacing one an interrupted failover left) that runs `RESUME`
/// `deadline` from now, then `PAUSE`. The timer's script loads the root-only admin file
/// itself; it is written to a root-only directory, since systemd would expand `$VARIABLES` in
/// a command given to `systemd-run`. Run with the admin file loaded, as
/// [`pgbouncer_admin_line`].
pub fn pgbouncer_pause_line(layout: &Layout, deadline: Duration) -> String {
    let script = format!(
        "set -a\n. {admin_env}\nset +a\nexec {resume}\n",
        admin_env = shell_quote(&crate::pgbouncer_admin_env(layout).display().to_string()),
        resume = pgbouncer_admin_line(&["RESUME"]),
    );
    let dir = PGBOUNCER_RESUME_DIR;
    let unit = PGBOUNCER_RESUME_UNIT;
    format!(
        "set -e; systemctl stop {unit}.timer {unit}.service >/dev/null 2>&1 || true; \
         install -d -m 0700 {dir}; printf '%s' {script} > {dir}/resume.sh.tmp; \
         chmod 0700 {dir}/resume.sh.tmp; mv -f {dir}/resume.sh.tmp {dir}/resume.sh; \
         systemd-run --quiet --collect --unit={unit} --on-active={secs}s \
         --timer-property=AccuracySec=1s /bin/sh {dir}/resume.sh; {pause}",
        script = shell_quote(&script),
        secs = deadline.as_secs().max(1),
        pause = pgbouncer_admin_line(&["PAUSE"]),
    )
}

/// Resumes PgBouncer after a failover (`RECONNECT` first when `reconnect`: server connections
/// made through the old tunnels go) and cancels the deadline's timer. A pool the deadline
/// already resumed counts as resumed (said on standard error); when `RESUME` fails otherwise,
/// the timer stays armed, so the pool still resumes at the deadline.
pub fn pgbouncer_resume_line(reconnect: bool) -> String {
    let commands: &[&str] = if reconnect {
        &["RECONNECT", "RESUME"]
    } else {
        &["RESUME"]
    };
    format!(
        "if ! out=$({admin} 2>&1); then case $out in \
         *'not paused'*) echo 'rigger: the pause deadline had already resumed PgBouncer' >&2 ;; \
         *) printf '%s\\n' \"$out\" >&2; exit 1 ;; esac; fi; \
         systemctl stop {unit}.timer >/dev/null 2>&1 || true",
        admin = pgbouncer_admin_line(commands),
        unit = PGBOUNCER_RESUME_UNIT,
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
    fn a_pause_arms_its_deadline_before_pausing() {
        let layout = Layout::systemd("shop");
        let line = pgbouncer_pause_line(&layout, Duration::from_secs(120));
        sh_n(&line);
        let timer = line
            .find("systemd-run --quiet --collect --unit=rigger-pgbouncer-resume --on-active=120s")
            .unwrap_or_else(|| panic!("no timer: {line}"));
        let pause = line.find("-c PAUSE").unwrap();
        assert!(timer < pause, "PAUSE before its deadline is armed: {line}");
        assert!(line.starts_with("set -e; "), "{line}");
        // An interrupted failover's timer is replaced, not an error.
        assert!(
            line.contains("systemctl stop rigger-pgbouncer-resume.timer rigger-pgbouncer-resume.service >/dev/null 2>&1 || true"),
            "{line}"
        );
        // The timer runs a root-only script, so systemd has no `$` to expand in its command.
        let command = &line[timer..line[timer..].find(';').unwrap() + timer];
        assert!(!command.contains('$'), "{command}");
        assert!(
            command.ends_with("/bin/sh /run/rigger-failover/resume.sh"),
            "{command}"
        );
    }

    #[test]
    fn the_deadlines_script_loads_the_admin_file_and_resumes() {
        let layout = Layout::systemd("shop");
        let line = pgbouncer_pause_line(&layout, Duration::from_secs(90));
        let dir = tempfile::tempdir().unwrap();
        // The script as the line writes it: run the line's printf alone.
        let printf = line
            .split("; ")
            .find(|part| part.starts_with("printf '%s' "))
            .unwrap()
            .replace("/run/rigger-failover/resume.sh.tmp", "\"$1\"");
        let script = dir.path().join("resume.sh");
        let status = std::process::Command::new("sh")
            .args(["-c", &printf, "sh"])
            .arg(&script)
            .status()
            .unwrap();
        assert!(status.success());
        let text = std::fs::read_to_string(&script).unwrap();
        assert_eq!(
            text,
            format!(
                "set -a\n. /etc/rigger/pgbouncer/admin.env\nset +a\nexec {}\n",
                pgbouncer_admin_line(&["RESUME"])
            )
        );
        sh_n(&text);
    }

    /// Runs `line` with stand-ins for `psql` (printing `psql_says` on stderr and exiting with
    /// `psql_exit`) and `systemctl` (recording its arguments); returns the exit code, stderr
    /// and systemctl's calls.
    fn run_with_stubs(line: &str, psql_says: &str, psql_exit: i32) -> (i32, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let calls = dir.path().join("systemctl.calls");
        let stub = |name: &str, body: String| {
            let path = bin.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        stub(
            "psql",
            format!(
                "printf '%s\\n' {} >&2; exit {psql_exit}",
                shell_quote(psql_says)
            ),
        );
        stub(
            "systemctl",
            format!(
                "echo \"$*\" >> {}",
                shell_quote(&calls.display().to_string())
            ),
        );
        let output = std::process::Command::new("sh")
            .args(["-c", line])
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .output()
            .unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stderr).into_owned(),
            std::fs::read_to_string(&calls).unwrap_or_default(),
        )
    }

    #[test]
    fn resuming_cancels_the_deadline_and_accepts_a_pool_it_resumed() {
        let line = pgbouncer_resume_line(true);
        sh_n(&line);
        assert!(line.contains("-c RECONNECT -c RESUME"), "{line}");
        // Resumed by rigger: the timer is cancelled.
        let (code, _, calls) = run_with_stubs(&line, "", 0);
        assert_eq!(
            (code, calls.as_str()),
            (0, "stop rigger-pgbouncer-resume.timer\n")
        );
        // Resumed by the deadline already: fine, and said.
        let (code, stderr, calls) =
            run_with_stubs(&line, "ERROR:  pooler is not paused/suspended", 1);
        assert_eq!(code, 0, "{stderr}");
        assert!(stderr.contains("the pause deadline had already resumed PgBouncer"));
        assert_eq!(calls, "stop rigger-pgbouncer-resume.timer\n");
        // Not resumed: the failure is reported and the deadline stays armed.
        let (code, stderr, calls) = run_with_stubs(&line, "connection refused", 2);
        assert_eq!(code, 1);
        assert!(stderr.contains("connection refused"), "{stderr}");
        assert_eq!(calls, "");
    }

    #[test]
    fn the_admin_console_line_keeps_the_password_in_the_environment() {
        let admin = pgbouncer_admin_line(&["RECONNECT", "RESUME"]);
        assert!(
            admin.starts_with("PGPASSWORD=\"$PGBOUNCER_ADMIN_PASSWORD\""),
            "{admin}"
        );
        assert!(admin.ends_with("-c RECONNECT -c RESUME"), "{admin}");
        sh_n(&admin);
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
