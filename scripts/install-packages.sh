#!/usr/bin/env bash
# Installs the Debian packages rigger needs on a machine (Debian 12 "bookworm", run as root),
# and checks that a Rust toolchain is there. Idempotent: installs only what is missing.
#
# Debian starts a package's daemon when it is installed; rigger runs its own instances of
# nginx, HAProxy, PostgreSQL, PgBouncer, Redis and RabbitMQ on 127.x addresses, and the
# distribution's copies would squat their ports. So daemons are kept from starting during the
# install (policy-rc.d), and any of those daemons that the install did start anyway is stopped.
#
# Progress goes to stderr, one line a step; the last line on stdout says what was installed.
set -euo pipefail

PACKAGES=(
  nginx-light haproxy postgresql postgresql-client pgbouncer stunnel4 redis-server
  rabbitmq-server ssl-cert openssl python3 python3-venv python3-pip curl ca-certificates git
  shellcheck openssh-server openssh-client procps iproute2 util-linux nftables
  mmdebstrap systemd-container
)
# Any of these provides /usr/sbin/nginx; nginx-light is wanted only when none is installed.
NGINX_FLAVOURS=(nginx-light nginx nginx-core nginx-full nginx-extras)
POLICY_RC_D=/usr/sbin/policy-rc.d
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf 'install-packages: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Runs a command with its output hidden, showing it only if the command fails.
quietly() {
  local out
  out=$(mktemp)
  if ! "$@" >"$out" 2>&1; then
    cat "$out" >&2
    rm -f "$out"
    die "failed: $*"
  fi
  rm -f "$out"
}

is_installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}

has_candidate() {
  local candidate
  candidate=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')
  [ -n "$candidate" ] && [ "$candidate" != "(none)" ]
}

# True when the first pidfile given names a live process.
pidfile_alive() {
  local file pid
  for file in "$@"; do
    [ -f "$file" ] || continue
    pid=$(head -n 1 "$file" 2>/dev/null | tr -dc '0-9')
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      return 0
    fi
  done
  return 1
}

# service name -> is the distribution's own instance running (by its pidfiles under /run)?
distro_service_running() {
  case "$1" in
    nginx) pidfile_alive /run/nginx.pid ;;
    haproxy) pidfile_alive /run/haproxy.pid ;;
    redis-server) pidfile_alive /run/redis/redis-server.pid ;;
    postgresql) pidfile_alive /run/postgresql/[0-9]*-*.pid ;;
    pgbouncer) pidfile_alive /run/postgresql/pgbouncer.pid ;;
    rabbitmq-server) pidfile_alive /run/rabbitmq/pid /run/rabbitmq/*.pid ;;
    stunnel4) pidfile_alive /run/stunnel4/*.pid /run/stunnel4.pid ;;
    *) return 1 ;;
  esac
}
DISTRO_SERVICES=(nginx haproxy redis-server postgresql pgbouncer rabbitmq-server stunnel4)

# The distribution's epmd (started by its rabbitmq-server or by an Erlang tool) listens on the
# default port 4369 of every address; rigger's own epmd instances are bound to 127.x addresses.
distro_epmd_running() {
  command -v ss >/dev/null 2>&1 || return 1
  ss -Hltn 'sport = :4369' 2>/dev/null | awk '{print $4}' | grep -Eq '^(0\.0\.0\.0|\*|\[::\]):4369$'
}

[ "$(id -u)" -eq 0 ] || die "run me as root (apt-get install needs it)"
for tool in apt-get apt-cache dpkg-query; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found: this script is for Debian 12 (bookworm)"
done

# --- which packages are missing -----------------------------------------------------------------
missing=()
for package in "${PACKAGES[@]}"; do
  if [ "$package" = nginx-light ]; then
    have_nginx=no
    for flavour in "${NGINX_FLAVOURS[@]}"; do
      if is_installed "$flavour"; then have_nginx=yes; fi
    done
    [ "$have_nginx" = yes ] || missing+=(nginx-light)
  elif ! is_installed "$package"; then
    missing+=("$package")
  fi
done

log "checking ${#PACKAGES[@]} packages: ${#missing[@]} missing"
if [ "${#missing[@]}" -gt 0 ]; then
  # Remember which of the distribution's daemons were already running: those are not ours to stop.
  declare -A running_before=()
  for service in "${DISTRO_SERVICES[@]}"; do
    if distro_service_running "$service"; then running_before[$service]=1; fi
  done
  epmd_before=no
  if distro_epmd_running; then epmd_before=yes; fi

  # Keep Debian from starting the daemons it installs.
  created_policy=no
  if [ ! -e "$POLICY_RC_D" ]; then
    printf '#!/bin/sh\n# written by rigger scripts/install-packages.sh while it installs\nexit 101\n' >"$POLICY_RC_D"
    chmod 0755 "$POLICY_RC_D"
    created_policy=yes
    trap 'rm -f "$POLICY_RC_D"' EXIT
  fi

  log "apt-get update"
  quietly apt-get -q update

  # nginx-light is gone from newer Debian releases: fall back to nginx.
  for i in "${!missing[@]}"; do
    if [ "${missing[$i]}" = nginx-light ] && ! has_candidate nginx-light; then
      missing[i]=nginx
    fi
  done

  log "apt-get install ${missing[*]}"
  quietly env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o DPkg::Lock::Timeout=300 \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${missing[@]}"

  if [ "$created_policy" = yes ]; then
    rm -f "$POLICY_RC_D"
    trap - EXIT
  fi

  # Stop whatever the install started despite policy-rc.d (e.g. a policy that allowed it).
  for service in "${DISTRO_SERVICES[@]}"; do
    if [ -z "${running_before[$service]:-}" ] && distro_service_running "$service"; then
      log "stopping the distribution's $service (rigger runs its own)"
      quietly service "$service" stop
    fi
  done
  if [ "$epmd_before" = no ] && distro_epmd_running; then
    # Refuses (and we carry on) if an Erlang node is still registered with it.
    log "stopping the distribution's epmd on port 4369"
    epmd -kill >/dev/null 2>&1 || log "warning: epmd on port 4369 did not stop"
  fi
fi

# --- Rust toolchain (cannot be downloaded from here: it must already be installed) --------------
cargo_bin=$(command -v cargo 2>/dev/null || true)
if [ -z "$cargo_bin" ] && [ -x "${HOME:-/root}/.cargo/bin/cargo" ]; then
  cargo_bin="${HOME:-/root}/.cargo/bin/cargo"
fi
if [ -z "$cargo_bin" ]; then
  die "no Rust toolchain: cargo is neither on PATH nor in ${HOME:-/root}/.cargo/bin.
  Install it with rustup (https://rustup.rs: curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal),
  then open a new shell or run '. \"\$HOME/.cargo/env\"'. Debian's own 'cargo' package is too old for this workspace."
fi
wanted=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$REPO_ROOT/Cargo.toml" 2>/dev/null | head -n 1)
have=$("$(dirname "$cargo_bin")/rustc" --version 2>/dev/null | awk '{print $2}' || true)
if [ -n "$wanted" ] && [ -n "$have" ]; then
  oldest=$(printf '%s\n%s\n' "$wanted" "${have%%-*}" | sort -V | head -n 1)
  if [ "$oldest" != "$wanted" ]; then
    die "Rust $have is older than the workspace's rust-version $wanted: run 'rustup update stable'"
  fi
fi
log "rust toolchain: $("$cargo_bin" --version 2>/dev/null || echo "$cargo_bin")"

if [ "${#missing[@]}" -gt 0 ]; then
  echo "installed: ${missing[*]}"
else
  echo "all packages present"
fi
