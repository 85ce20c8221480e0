#!/usr/bin/env bash
# usage: python-venv.sh DIR REQUIREMENTS_FILE...
#
# Creates (if missing) a virtualenv at DIR with Debian's /usr/bin/python3 and pip-installs the
# given requirements files into it. A stamp file in DIR records the sha256 of the requirements
# (and of the Python version), so a later run with the same requirements does nothing.
# The venv must be readable by service users (gunicorn, Celery), so it may not live under /root.
set -euo pipefail

PYTHON=/usr/bin/python3
STAMP_NAME=.rigger-requirements.sha256

log() { printf 'python-venv: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$#" -ge 2 ] || die "usage: $0 DIR REQUIREMENTS_FILE..."
dir=$1
shift
[ -x "$PYTHON" ] || die "$PYTHON not found (install python3 and python3-venv)"

# Absolute, normalised path of the venv (it need not exist yet).
dir=$(realpath -m -- "$dir")
case "$dir" in
  /root | /root/*) die "$dir is under /root, which service users cannot read: pick e.g. /opt/... or /var/lib/..." ;;
  /) die "refusing to use / as a venv" ;;
esac

requirements=()
for file in "$@"; do
  { [ -f "$file" ] && [ -r "$file" ]; } || die "requirements file not found or unreadable: $file"
  requirements+=("$(realpath -- "$file")")
done

# Whatever we create must be readable (and the directories traversable) by everyone.
umask 022

# Every existing ancestor must be traversable by other users, or service users cannot reach it.
parent=$(dirname "$dir")
while [ "$parent" != / ]; do
  if [ -d "$parent" ] && [ "$(( 0$(stat -c '%a' "$parent") & 1 ))" -eq 0 ]; then
    die "$parent is not searchable by other users (mode $(stat -c '%a' "$parent")): service users could not reach $dir"
  fi
  parent=$(dirname "$parent")
done

mkdir -p -- "$dir"
# One run at a time for the same venv (the lock is on the directory itself, which
# `venv --clear` keeps, so no lock file is left behind).
exec 9<"$dir"
flock 9

python_version=$("$PYTHON" -c 'import sys; print(sys.version)')
wanted=$(
  {
    printf 'python %s\n' "$python_version"
    for file in "${requirements[@]}"; do
      printf 'file %s\n' "$(basename "$file")"
      cat -- "$file"
      printf '\n'
    done
  } | sha256sum | awk '{print $1}'
)
stamp="$dir/$STAMP_NAME"

venv_works() {
  [ -x "$dir/bin/python" ] && "$dir/bin/python" -c 'import sys' >/dev/null 2>&1
}

if venv_works && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  echo "venv up to date"
  exit 0
fi

if ! venv_works; then
  if [ -e "$dir/pyvenv.cfg" ]; then
    # A broken venv (e.g. its Python was upgraded away): rebuild it in place.
    log "recreating broken venv at $dir"
    "$PYTHON" -m venv --clear "$dir" || die "could not recreate the venv (is python3-venv installed?)"
  else
    log "creating venv at $dir with $PYTHON"
    "$PYTHON" -m venv "$dir" || die "could not create the venv (is python3-venv installed?)"
  fi
fi

rm -f -- "$stamp"
pip_args=()
for file in "${requirements[@]}"; do
  pip_args+=(-r "$file")
done
log "pip install ${pip_args[*]}"
out=$(mktemp)
if ! "$dir/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
  "${pip_args[@]}" >"$out" 2>&1; then
  cat "$out" >&2
  rm -f "$out"
  die "pip install failed for $dir"
fi
rm -f "$out"

printf '%s\n' "$wanted" >"$stamp.tmp"
mv -f -- "$stamp.tmp" "$stamp"
echo "venv ready: $dir"
