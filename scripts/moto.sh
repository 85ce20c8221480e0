#!/usr/bin/env bash
# usage: moto.sh
#
# Installs moto's server (the AWS emulator the rigger-aws tests and bench/aws-up run against)
# into a venv at /var/tmp/rigger-moto-venv with Debian's /usr/bin/python3, if it is not there
# yet, and prints the path of its `moto_server`. Idempotent and safe to run concurrently: a
# second run finds the stamp and does nothing.
set -euo pipefail

PYTHON=/usr/bin/python3
VENV=${RIGGER_MOTO_VENV:-/var/tmp/rigger-moto-venv}
# Pinned below a major version so a future moto cannot change the emulator under the tests.
REQUIREMENT='moto[server]>=5,<6'
# Where moto differs from AWS in ways rigger's code trips on (scripts/moto_fixes.py): loaded
# by every python of the venv. Its hash is part of the stamp, so a changed fix is installed.
FIXES=$(dirname "$0")/moto_fixes.py

log() { printf 'moto.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ -x "$PYTHON" ] || die "$PYTHON not found (apt-get install python3 python3-venv)"
mkdir -p -- "$VENV"
exec 9<"$VENV"
flock 9

stamp="$VENV/.rigger-moto"
wanted="$REQUIREMENT $(sha256sum <"$FIXES" | cut -c1-16)"
if [ -x "$VENV/bin/moto_server" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  echo "$VENV/bin/moto_server"
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv at $VENV"
  "$PYTHON" -m venv "$VENV" || die "could not create the venv (apt-get install python3-venv)"
fi
log "installing $REQUIREMENT"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$REQUIREMENT" >&2 \
  || die "pip could not install $REQUIREMENT"
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp -- "$FIXES" "$site/rigger_moto_fixes.py"
echo 'import rigger_moto_fixes; rigger_moto_fixes.apply()' >"$site/rigger_moto_fixes.pth"
"$VENV/bin/python" -c 'from moto.ec2.models.launch_templates import LaunchTemplateVersion as V; import rigger_moto_fixes; assert V.user_data.fget.__module__ == "rigger_moto_fixes"' \
  || die "the emulator fixes in $FIXES no longer apply to this moto"
printf '%s' "$wanted" >"$stamp"
echo "$VENV/bin/moto_server"
