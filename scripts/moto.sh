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

log() { printf 'moto.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ -x "$PYTHON" ] || die "$PYTHON not found (apt-get install python3 python3-venv)"
mkdir -p -- "$VENV"
exec 9<"$VENV"
flock 9

stamp="$VENV/.rigger-moto"
if [ -x "$VENV/bin/moto_server" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$REQUIREMENT" ]; then
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
printf '%s' "$REQUIREMENT" >"$stamp"
echo "$VENV/bin/moto_server"
