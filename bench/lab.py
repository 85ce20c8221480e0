"""Driver of bench/lab (read it first): a lab of its own, the example site's AWS environment
`bench` in it, `rigger up` timed to serving through the lab's load balancer, then each
machine's boot time and memory. Runs with moto's venv (boto3); cleans up whatever happens."""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3

REPO = Path(__file__).resolve().parent.parent
ENV = "bench"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rigger", required=True)
    parser.add_argument("--emulator", required=True)
    parser.add_argument("--load-balancer", choices=["classic", "application"], default="classic",
                        help="the kind of load balancer rigger makes (rigger.toml's load_balancer)")
    parser.add_argument("--image", choices=["baked", "stock", "built"], default="baked",
                        help="what the servers boot: the lab's baked image (every role's packages); "
                             "the stock one (Debian's EC2 AMI as it is: boots install packages "
                             "from Debian's archive through the lab's mirror); or the stock one "
                             "with `rigger image build` first (timed), as in production")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rigger-bench-lab.", dir="/var/tmp"))
    lab = [args.rigger, "lab", "--dir", str(work / "lab")]
    try:
        run(lab + ["up", "--emulator", args.emulator])
        bench(args, work, lab)
    finally:
        subprocess.run(lab + ["down"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def run(command, **kwargs) -> str:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        sys.exit(f"bench/lab: {' '.join(map(str, command))} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def bench(args, work: Path, lab) -> None:
    status = json.loads(run(lab + ["status", "--json"]))
    endpoint = status["endpoint"]
    session = dict(
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    site = work / "site"
    shutil.copytree(REPO / "examples/site/app", site / "app")
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com", "-C", str(site / "app")]
    run(git + ["init", "-q"])
    run(git + ["add", "."])
    run(git + ["commit", "-qm", "site"])
    state = work / "state"
    ssh = state / "surveys" / ENV / "ssh"
    ssh.mkdir(parents=True)
    (ssh / "known_hosts").write_text(status["bastion"]["known_hosts_line"] + "\n")
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(site / "id_ed25519")])
    public = " ".join((site / "id_ed25519.pub").read_text().split()[:2])
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
         "-subj", "/CN=surveys.example.com", "-keyout", str(site / "lb.key"),
         "-out", str(site / "lb.crt")])
    certificate = boto3.client("iam", **session).upload_server_certificate(
        ServerCertificateName="surveys-bench",
        CertificateBody=(site / "lb.crt").read_text(),
        PrivateKey=(site / "lb.key").read_text(),
    )["ServerCertificateMetadata"]["Arn"]
    config = (REPO / "examples/site/lab.toml.template").read_text()
    for placeholder, value in {
        "@ENV@": ENV, "@AMI@": status["amis"]["baked" if args.image == "baked" else "stock"],
        "@LOAD_BALANCER@": args.load_balancer,
        "@CERTIFICATE@": certificate, "@PUBLIC_KEY@": public,
        "@BASTION@": status["bastion"]["target"],
    }.items():
        config = config.replace(placeholder, value)
    (site / "rigger.toml").write_text(config)
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_MAX_ATTEMPTS="1", RIGGER_STATE_DIR=str(state), NO_COLOR="1")

    def rigger(*words) -> str:
        return run([args.rigger, *words, "-e", ENV, "--endpoint-url", endpoint], cwd=site, env=env)

    print(f"image: {args.image}")
    if args.image == "built":
        building = time.monotonic()
        ami = rigger("image", "build").strip()
        print(f"rigger image build (from the stock image): {time.monotonic() - building:.1f} s -> {ami}")
    started = time.monotonic()
    phases = timed_up([args.rigger, "up", "-e", ENV, "--endpoint-url", endpoint], site, env, started)
    up_done = time.monotonic()
    url = json.loads(rigger("status", "--json"))["urls"][0]
    address = url.removeprefix("https://").rstrip("/")
    while True:
        code = subprocess.run(
            ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
             "--resolve", f"surveys.example.com:443:{address}", "https://surveys.example.com/"],
            capture_output=True, text=True).stdout
        if code == "200":
            break
        time.sleep(0.2)
    serving = time.monotonic()
    print(f"rigger up (returns when every server is in service): {up_done - started:.1f} s")
    print(f"first 200 through the load balancer: {serving - started:.1f} s after up started")
    print("rigger up's phases (seconds after it started): " + "; ".join(
        f"{what} {at:.1f}" for what, at in phases))

    memory = {m["instance_id"]: m.get("memory_pss_bytes") or 0
              for m in json.loads(run(lab + ["status", "--json"]))["machines"]}
    print("machine: launch to user-data done; memory (PSS); boot steps of 3 s or more")
    ec2 = boto3.client("ec2", **session)
    rows = []
    for reservation in ec2.describe_instances()["Reservations"]:
        for instance in reservation["Instances"]:
            if instance["State"]["Name"] != "running":
                continue
            name = next((t["Value"] for t in instance.get("Tags", []) if t["Key"] == "Name"), "?")
            done = work / "lab/machines" / instance["InstanceId"] / "upper/var/lib/cloud/instance/boot-finished"
            boot = (f"{done.stat().st_mtime - instance['LaunchTime'].timestamp():5.1f} s"
                    if done.exists() else "not finished")
            log = work / "lab/machines" / instance["InstanceId"] / "upper/var/log/cloud-init-output.log"
            rows.append((name, boot, memory.get(instance["InstanceId"], 0), slow_steps(log)))
    for name, boot, pss, steps in sorted(rows):
        print(f"  {name:<26} {boot:>12}  {pss / 2**20:6.0f} MiB   {steps}")
    print(f"memory, all machines: {sum(row[2] for row in rows) / 2**20:.0f} MiB")
    rigger("down", "--yes")


# The first line of `rigger up`'s output that marks each phase, and the phase's name.
UP_PHASES = [
    ("built the first release", "release built"),
    ("uploaded the first release", "release uploaded"),
    ("creating group_server", "first server launched"),
    ("waiting for", "every resource made, waiting"),
    ("every server is in service", "every server in service"),
]


def timed_up(command, site: Path, env, started: float):
    """Runs `rigger up`, noting when each of UP_PHASES first shows in its output."""
    process = subprocess.Popen(command, cwd=site, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    phases, output = [], []
    for line in process.stdout:
        output.append(line)
        for marker, name in UP_PHASES:
            if marker in line and name not in (n for n, _ in phases):
                phases.append((name, time.monotonic() - started))
    if process.wait() != 0:
        sys.exit("bench/lab: rigger up failed:\n" + "".join(output))
    return phases


def slow_steps(log: Path) -> str:
    """The boot script's steps that took 3 s or more, slowest first, from the times its `step`
    lines carry (`rigger: [12 s] installing packages`)."""
    if not log.exists():
        return ""
    marks = []
    for line in log.read_text(errors="replace").splitlines():
        match = re.match(r"rigger: \[(\d+) s\] (.*)", line)
        if match:
            marks.append((int(match.group(1)), match.group(2)))
    durations = [(end[0] - start[0], start[1]) for start, end in zip(marks, marks[1:])]
    slow = sorted((d for d in durations if d[0] >= 3), reverse=True)
    return "; ".join(f"{step} {seconds} s" for seconds, step in slow)


if __name__ == "__main__":
    main()
