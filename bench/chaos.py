#!/usr/bin/env python3
"""The chaos harness: the example site on the local provider under steady HTTPS load, hurt
TRIALS times per scenario with SIGKILL at a random moment, then checked.

Usage: chaos.py RIGGER URL TRIALS SCENARIO...   (run from the project directory; bench/chaos
sets it up). Scenarios:
  supervisor-idle     the supervisor, while nothing else happens
  supervisor-deploy   the supervisor, during `rigger deploy` (re-run when it was cut off)
  supervisor-rollback the supervisor, during `rigger rollback` (after a deploy; re-run)
  supervisor-scale    the supervisor, during `rigger scale web=3` / `web=2` (re-run)
  supervisor-promote  the supervisor, during `rigger db promote` (re-run unless the primary
                      changed: then it was done)
  cli-deploy          the `rigger deploy` CLI itself (re-run once the lock is free)
  cli-rollback        the `rigger rollback` CLI itself
  cli-scale           the `rigger scale` CLI itself
  cli-promote         the `rigger db promote` CLI itself
  supervisor-up       the supervisor, during `rigger up` from nothing (the keeper starts
                      another; `up` goes on waiting for it)
  cli-up              the `rigger up` CLI itself (re-run)
  supervisor-down     the supervisor, during `rigger down` (its keeper must not start another)
  cli-down            the `rigger down` CLI itself (re-run)
  service             a random service process (gunicorn, nginx, PgBouncer, stunnel, Celery,
                      Redis, RabbitMQ, PostgreSQL primary or replica)

After each kill it re-runs the command that was cut off, waits for the environment to
converge (status `ready`, the groups at their desired counts, every process running, every
replica streaming from the primary; for the
down scenarios: nothing of the environment running, no keeper, then `up` again untimed) and
checks: no orphan (a live process recorded under servers/ that the status does not show), no
deploy lock left, every entry of the release and database histories a final result (and a
database operation the trial asked for recorded there, `interrupted` if it was cut off), every row the site
acknowledged during the trial (a writer posts one every 0.2 s throughout) on the primary. The up and down scenarios run no load (the site is down on
purpose; their failed column shows "-"). Prints, per scenario: trials, converged, orphans, failed
requests, seconds to converge (median, max); exits 1 when any trial did not converge or left
an orphan, or when a supervisor or CLI kill failed a request.
"""
import glob
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

CONVERGE_TIMEOUT = 300
LOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "load.py")


def rigger(binary, *args, check=True):
    done = subprocess.run([binary, "-q", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"rigger {' '.join(args)}: {done.stderr.strip()}")
    return done


def status(binary):
    done = rigger(binary, "status", "--json", check=False)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return {}


def converged(state):
    if state.get("phase") != "ready":
        return False
    servers = state.get("servers", [])
    for group in state.get("groups", []):
        members = [s for s in servers if s["id"].startswith(group["name"] + "-") and s["state"] == "in_service"]
        if len(members) != group["desired"]:
            return False
    if not all(p["state"] == "running" for s in servers for p in s.get("processes", [])):
        return False
    # Every replica streams from the primary: a failover finished wrong (two primaries) has
    # every server running and the site answering, and no copy of the data.
    replicas = [s for s in servers if "db-replica" in s.get("roles", [])]
    streaming = [r for r in state.get("replication", []) if r.get("state") == "streaming"]
    return len(streaming) >= len(replicas)


def wait_converged(binary):
    started = time.monotonic()
    while time.monotonic() - started < CONVERGE_TIMEOUT:
        state = status(binary)
        if converged(state):
            return time.monotonic() - started, state
        time.sleep(0.2)
    return None, status(binary)


def state_dir(binary):
    """The environment's state directory, from `rigger status --json`'s supervisor or the
    default layout under RIGGER_STATE_DIR."""
    base = os.environ.get("RIGGER_STATE_DIR", "/var/lib/rigger")
    project = status(binary).get("project")
    return os.path.join(base, project, "local")


def orphans(env_dir, state):
    """Live processes recorded in pid files under servers/ that the status does not show."""
    shown = {p["pid"] for s in state.get("servers", []) for p in s.get("processes", [])}
    found = []
    for path in glob.glob(os.path.join(env_dir, "servers", "*", "pids", "*.pid")):
        try:
            with open(path) as file:
                record = json.load(file)
            with open(f"/proc/{record['pid']}/stat") as file:
                fields = file.read().rsplit(") ", 1)[1].split()
        except (OSError, ValueError, KeyError, IndexError):
            continue
        alive = fields[0] not in ("Z", "X") and int(fields[19]) == record["start_time"]
        if alive and record["pid"] not in shown:
            found.append(record["name"])
    return found


def lock_left(binary):
    """Whether the deploy lock is held at all (a stale one counts: it was left behind)."""
    done = rigger(binary, "lock", "status", check=False)
    return done.stdout.strip() != "free"


def lock_held_live(binary):
    done = rigger(binary, "lock", "status", check=False)
    return done.stdout.startswith("held by")


def history_of(binary, *command):
    """A history's records (`rigger releases`, `rigger db history`), or None when unreadable."""
    done = rigger(binary, *command, "--json", check=False)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return None


def history_consistent(binary, db_records_before, asked_the_database):
    """Every deploy and database operation ended with a final result, and a database
    operation the trial asked for (run again if it was cut off) is in the database history."""
    releases = history_of(binary, "releases")
    operations = history_of(binary, "db", "history")
    if releases is None or operations is None:
        return False
    final = all(entry.get("result") in ("succeeded", "rolled back", "failed", "interrupted") for entry in releases) \
        and all(entry.get("result") in ("succeeded", "failed", "interrupted") for entry in operations)
    return final and (not asked_the_database or len(operations) > db_records_before)


def service_processes(state):
    return [(s["id"], p["name"], p["pid"]) for s in state.get("servers", [])
            for p in s.get("processes", []) if p["state"] == "running" and s["id"] != "lb"]


def commit_change(tag):
    with open("app/polls/views.py", "a") as file:
        file.write(f"\n# chaos {tag}\n")
    subprocess.run(["git", "-c", "user.name=chaos", "-c", "user.email=chaos@example.com",
                    "commit", "-qam", f"chaos {tag}"], check=True)


def site_request(url, *args):
    done = subprocess.run(["curl", "-sk", "--noproxy", "*", "--max-time", "10", *args, url],
                          capture_output=True, text=True)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return {}


def write_row(url, text):
    """A row through the site (the app's notes): its id once acknowledged, else None."""
    answer = site_request(url.replace("/healthcheck.html", "/notes"), "-X", "POST",
                          "-H", "content-type: application/json", "-d", json.dumps({"text": text}))
    return answer.get("id")


def rows_present(url, ids):
    """Whether every acknowledged row is on the primary."""
    return all(site_request(url.replace("/healthcheck.html", f"/notes/{i}?from=primary")).get("found")
               for i in ids)


# Scenarios where the site is down on purpose: their failed requests are not counted against
# them.
SITE_DOWN = ("supervisor-up", "cli-up", "supervisor-down", "cli-down")


def supervisor_pid(env_dir):
    """The supervisor holding the environment's lock now, from its lock file."""
    try:
        with open(os.path.join(env_dir, "supervisor.lock")) as file:
            return json.load(file)["pid"]
    except (OSError, ValueError, KeyError):
        return None


def process_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(") ", 1)[1][0] not in "ZX"
    except (OSError, IndexError):
        return False


def wait_down(env_dir):
    """Waits until nothing of the environment runs: no live pid record, no keeper."""
    started = time.monotonic()
    while time.monotonic() - started < CONVERGE_TIMEOUT:
        keeper = None
        try:
            with open(os.path.join(env_dir, "keeper.json")) as file:
                keeper = json.load(file)["keeper"]["pid"]
        except (OSError, ValueError, KeyError):
            pass
        if not orphans(env_dir, {}) and not (keeper and process_alive(keeper)):
            return True
        time.sleep(0.2)
    return False


def current_primary(binary):
    done = rigger(binary, "db", "status", "--json", check=False)
    try:
        return json.loads(done.stdout).get("primary")
    except json.JSONDecodeError:
        return None


class Writer:
    """Writes a row through the site every 0.2 s from a thread of its own for the whole trial
    and keeps the ids the site acknowledged: every one must be on the primary at the end."""

    def __init__(self, url, tag):
        self.url, self.tag = url, tag
        self.acknowledged = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        number = 0
        while not self.stopping.wait(0.2):
            number += 1
            row = write_row(self.url, f"{self.tag}-{number}")
            if row is not None:
                self.acknowledged.append(row)

    def stop(self):
        self.stopping.set()
        self.thread.join()
        return self.acknowledged


# What each command is, made ready before the trial (untimed): the arguments of the command
# the trial runs and kills into, and the longest random delay before the kill.
def prepare_up(binary, state, tag):
    rigger(binary, "down")
    return ["up"]


def prepare_down(binary, state, tag):
    return ["down"]


def prepare_deploy(binary, state, tag):
    commit_change(tag)
    return ["deploy"]


def prepare_rollback(binary, state, tag):
    # A release to roll back from: deployed in full first.
    commit_change(tag)
    rigger(binary, "deploy")
    return ["rollback"]


def prepare_scale(binary, state, tag):
    web = next((g["desired"] for g in state.get("groups", []) if g["name"] == "web"), 2)
    return ["scale", f"web={3 if web == 2 else 2}"]


def prepare_promote(binary, state, tag):
    return ["db", "promote"]


# scenario: (what is killed, how its command is prepared, longest delay before the kill in s)
SCENARIOS = {
    "supervisor-idle": ("supervisor", None, 3.0),
    "supervisor-deploy": ("supervisor", prepare_deploy, 15.0),
    "supervisor-rollback": ("supervisor", prepare_rollback, 15.0),
    "supervisor-scale": ("supervisor", prepare_scale, 3.0),
    "supervisor-promote": ("supervisor", prepare_promote, 3.0),
    "supervisor-up": ("supervisor", prepare_up, 12.0),
    "supervisor-down": ("supervisor", prepare_down, 3.0),
    "cli-deploy": ("cli", prepare_deploy, 15.0),
    "cli-rollback": ("cli", prepare_rollback, 15.0),
    "cli-scale": ("cli", prepare_scale, 3.0),
    "cli-promote": ("cli", prepare_promote, 3.0),
    "cli-up": ("cli", prepare_up, 12.0),
    "cli-down": ("cli", prepare_down, 3.0),
    "service": ("service", None, 3.0),
}


def kill_victim(binary, victim, state, running, command, env_dir):
    """Kills the scenario's victim with SIGKILL; says what it killed."""
    if victim == "supervisor":
        pid = supervisor_pid(env_dir)
        if pid and process_alive(pid):
            os.kill(pid, signal.SIGKILL)
            return f"supervisor {pid}"
        return "nothing (no supervisor ran at that moment)"
    if victim == "cli":
        running.kill()
        return f"rigger {' '.join(command)}"
    server, name, pid = random.choice(service_processes(state))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    # The status is refreshed every second: converged means after it saw the death.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
            p == pid for _, _, p in service_processes(status(binary))):
        time.sleep(0.1)
    return f"{server}/{name}"


def run_again_if_cut(binary, command, primary_before):
    """Re-runs a command that was cut off, once no other operation holds the lock. A failover
    whose primary changed is done (the supervisor, or the keeper's next one, carried it on):
    run again it would be a second one."""
    deadline = time.monotonic() + CONVERGE_TIMEOUT
    while lock_held_live(binary) and time.monotonic() < deadline:
        time.sleep(0.5)
    if command[0] == "db" and current_primary(binary) != primary_before:
        return
    again = rigger(binary, *command, check=False)
    # Done already: the deploy is running, the replica promoted (the new one not built yet).
    done = ("nothing to deploy", "no replica to promote")
    if again.returncode != 0 and not any(reason in again.stderr for reason in done):
        print(f"  re-run of rigger {' '.join(command)} failed: {again.stderr.strip()[:200]}", file=sys.stderr)


def trial(binary, url, scenario, number, env_dir):
    victim, prepare, longest = SCENARIOS[scenario]
    stop_file = tempfile.mktemp(prefix="chaos-stop-")
    state = status(binary)
    command = prepare(binary, state, f"{scenario}-{number}") if prepare else None
    site_up = scenario not in SITE_DOWN
    # No load where the site is down on purpose: every request would fail, and say nothing.
    load = subprocess.Popen([sys.executable, LOAD, url, "4", "900", stop_file],
                            stdout=subprocess.PIPE, text=True) if site_up else None
    writer = Writer(url, f"chaos-{scenario}-{number}") if site_up else None
    time.sleep(1)
    state = status(binary)
    primary_before = current_primary(binary)
    db_records_before = len(history_of(binary, "db", "history") or [])
    running = subprocess.Popen([binary, "-q", *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True) if command else None
    time.sleep(random.uniform(0.2, longest))
    killed_at = time.monotonic()
    killed = kill_victim(binary, victim, state, running, command, env_dir)
    if running is not None and running.wait() != 0:
        run_again_if_cut(binary, command, primary_before)
    if command == ["down"]:
        # Down for good: nothing of it left running, then up again for the next trial.
        waited = True if wait_down(env_dir) else None
        seconds = time.monotonic() - killed_at if waited else None
        left_running = orphans(env_dir, {})
        rigger(binary, "up", check=False)
        _, final = wait_converged(binary)
    else:
        waited, final = wait_converged(binary)
        left_running = []
        # Time to converge: from the kill, through any re-run, to the environment being whole.
        seconds = time.monotonic() - killed_at if waited is not None else None
    acknowledged = writer.stop() if writer else []
    measured = {}
    if load is not None:
        open(stop_file, "w").close()
        measured = json.loads(load.communicate()[0] or "{}")
        os.unlink(stop_file)
    return {
        "killed": killed,
        "converged": seconds is not None,
        "seconds": seconds,
        "orphans": orphans(env_dir, final) + left_running,
        "lock_left": lock_left(binary),
        "history_ok": history_consistent(binary, db_records_before, bool(command) and command[0] == "db"),
        "rows_ok": rows_present(url, acknowledged),
        "rows": len(acknowledged),
        "failed": measured.get("failed", 0),
        "failures": measured.get("failures", []),
        "served": measured.get("served", 0),
    }


def main():
    binary, url, trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
    scenarios = sys.argv[4:]
    env_dir = state_dir(binary)
    random.seed(os.environ.get("CHAOS_SEED", time.time_ns()))
    bad = False
    print(f"{'scenario':<19} {'trials':>6} {'converged':>9} {'orphans':>7} {'failed':>6} {'served':>7} "
          f"{'rows':>5} {'median_s':>8} {'max_s':>6}")
    for scenario in scenarios:
        results = [trial(binary, url, scenario, number, env_dir) for number in range(trials)]
        times = [r["seconds"] for r in results if r["seconds"] is not None]
        converged_count = sum(r["converged"] for r in results)
        orphan_count = sum(len(r["orphans"]) for r in results)
        failed = "-" if scenario in SITE_DOWN else sum(r["failed"] for r in results)
        print(f"{scenario:<19} {trials:>6} {converged_count:>9} {orphan_count:>7} {failed:>6} "
              f"{sum(r['served'] for r in results):>7} {sum(r['rows'] for r in results):>5} "
              f"{statistics.median(times) if times else float('nan'):>8.1f} {max(times, default=float('nan')):>6.1f}")
        for number, r in enumerate(results):
            problems = [name for name, ok in (("not converged", r["converged"]), ("orphans " + ",".join(r["orphans"]), not r["orphans"]),
                                              ("deploy lock left", not r["lock_left"]), ("history inconsistent", r["history_ok"]),
                                              ("acknowledged row lost", r["rows_ok"])) if not ok]
            if scenario != "service" and scenario not in SITE_DOWN and r["failed"]:
                problems.append(f"{r['failed']} failed requests (first: {r['failures'][:2]})")
            if problems:
                bad = True
                print(f"  trial {number} (killed {r['killed']}): {'; '.join(problems)}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
