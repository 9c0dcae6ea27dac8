#!/usr/bin/env bash
# Idempotent set-up of a Debian 12 machine (as root) for building and testing:
# Debian packages, Python packages, a Docker daemon and a local registry on
# 127.0.0.1:5000. Safe to run again: it only installs or starts what is missing.
#
#   KAIROS_REGISTRY_DIR   registry storage (default /var/lib/kairos-registry)
#   DOCKER_HOST           if set, that engine is used and no dockerd is started
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs Debian packages and starts dockerd)"

APT_PACKAGES=(docker.io docker-registry mmdebstrap squashfs-tools tar curl ca-certificates)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import doit, docker, yaml, pytest, hypothesis' 2>/dev/null; then
  log "installing Python packages (pyproject.toml [test])"
  "$PY" -m pip install -q --disable-pip-version-check -e '.[test]'
fi

docker_ok() {
  if [ -n "${DOCKER_HOST:-}" ]; then
    /usr/bin/docker info >/dev/null 2>&1
  else
    curl -fsS --max-time 5 --unix-socket /var/run/docker.sock http://localhost/_ping >/dev/null 2>&1
  fi
}

if ! docker_ok; then
  [ -z "${DOCKER_HOST:-}" ] || die "DOCKER_HOST=$DOCKER_HOST does not answer"
  log "starting dockerd (log: /var/log/kairos-dockerd.log)"
  nohup dockerd >/var/log/kairos-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do docker_ok && break; sleep 1; done
  if ! docker_ok; then
    tail -n 30 /var/log/kairos-dockerd.log >&2 || true
    die "dockerd did not come up within 60 s (log above)"
  fi
fi
log "docker engine: $(/usr/bin/docker version --format '{{.Server.Version}}' 2>/dev/null)"

registry_ok() { curl -fsS --max-time 5 http://127.0.0.1:5000/v2/ >/dev/null 2>&1; }
if ! registry_ok; then
  dir=${KAIROS_REGISTRY_DIR:-/var/lib/kairos-registry}
  mkdir -p "$dir"
  cat >/etc/kairos-registry.yml <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir
  delete:
    enabled: true
http:
  addr: 127.0.0.1:5000
EOF
  log "starting the local registry on 127.0.0.1:5000 (storage $dir, log /var/log/kairos-registry.log)"
  nohup docker-registry serve /etc/kairos-registry.yml >/var/log/kairos-registry.log 2>&1 &
  for _ in $(seq 1 30); do registry_ok && break; sleep 1; done
  if ! registry_ok; then
    tail -n 30 /var/log/kairos-registry.log >&2 || true
    die "the registry did not answer on 127.0.0.1:5000 within 30 s (log above)"
  fi
fi
log "registry: http://127.0.0.1:5000 ok"
