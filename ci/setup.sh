#!/usr/bin/env bash
# Idempotent set-up of a Debian 12 machine (as root): what the selected flavors need to build,
# or with --all everything the test suite needs, a Docker daemon and a local registry on
# 127.0.0.1:5000. Safe to run again: it only installs or starts what is missing.
#
#   bash ci/setup.sh            the base (docker.io, docker-registry, curl, git, `pip install -e .`), then
#                               what `python3 -m tasks needs` lists for the flavors doit would build
#                               (KAIROS_FLAVORS, KAIROS_SHARD; default flavors/)
#   bash ci/setup.sh --all      the base, then `python3 -m tasks needs --all`: everything the tests need
#   bash ci/setup.sh --dry-run  print what would be installed and started, and change nothing
#                               (also KAIROS_SETUP_DRY_RUN=1); needs no root
#
#   KAIROS_REGISTRY_DIR   registry storage (default /var/lib/kairos-registry)
#   DOCKER_HOST           if set, that engine is used and no dockerd is started
# At the end it prints the time each part took: `setup: times: apt N s, pip N s, ...`.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }

ALL=0
DRY=0
case ${KAIROS_SETUP_DRY_RUN:-0} in 0 | "" | false | no) ;; *) DRY=1 ;; esac
for arg in "$@"; do
  case $arg in
    --all) ALL=1 ;;
    --dry-run) DRY=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $arg (usage: bash ci/setup.sh [--all] [--dry-run])" ;;
  esac
done
[ "$DRY" = 1 ] || [ "$(id -u)" = 0 ] || die "run as root (it installs Debian packages and starts dockerd)"
[ "$DRY" = 0 ] || log "dry run: nothing is installed or started"

# seconds per part, printed at the end
PARTS=(apt pip "go tools" npm systemd-measure services binfmt)
declare -A SPENT=()
for part in "${PARTS[@]}"; do SPENT[$part]=0; done
started=$SECONDS
spent() { SPENT[$1]=$((SPENT[$1] + SECONDS - started)); started=$SECONDS; }
print_times() {
  local line="" part
  for part in "${PARTS[@]}"; do line+="${line:+, }$part ${SPENT[$part]} s"; done
  log "times: $line"
}

docker_ok() {
  if [ -n "${DOCKER_HOST:-}" ]; then
    /usr/bin/docker info >/dev/null 2>&1
  else
    curl -fsS --max-time 5 --unix-socket /var/run/docker.sock http://localhost/_ping >/dev/null 2>&1
  fi
}
# an engine already answers and the docker CLI has buildx (e.g. a GitHub runner's preinstalled
# Docker): keep those packages; Debian's docker.io would conflict with them
KEEP_ENGINE=0
if command -v curl >/dev/null && docker_ok && docker buildx version >/dev/null 2>&1; then KEEP_ENGINE=1; fi

apt_updated=0
apt_install() {  # install the Debian packages of "$@" that are missing
  local missing=() p
  for p in "$@"; do
    [ "$p" != docker.io ] || [ "$KEEP_ENGINE" = 0 ] || continue
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  if [ "$DRY" = 1 ]; then log "would install Debian packages: ${missing[*]}"; return 0; fi
  log "installing Debian packages: ${missing[*]}"
  [ "$apt_updated" = 1 ] || apt-get update -qq
  apt_updated=1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

NEED_APT=() NEED_PIP=. NEED_GO=() NEED_NPM=() NEED_EXTRA=()
read_needs() {  # parse the lines of `python3 -m tasks needs` (tasks/needs.py) from stdin
  local group words
  while read -r group words; do
    case $group in
      apt:) read -ra NEED_APT <<<"$words" ;;
      pip:) NEED_PIP=$words ;;
      go:) read -ra NEED_GO <<<"$words" ;;
      npm:) read -ra NEED_NPM <<<"$words" ;;
      extra:) read -ra NEED_EXTRA <<<"$words" ;;
      *) die "unexpected line from python3 -m tasks needs: $group $words" ;;
    esac
  done
}
need_extra() { [[ " ${NEED_EXTRA[*]} " == *" $1 "* ]]; }

PY=${PYTHON:-python3}

# --- the base: what every machine needs (tasks/needs.py BASE), then the project's own packages --
base_out=$("$PY" -m tasks.needs) || die "$PY -m tasks.needs failed (python3 >= 3.11 is needed)"
read_needs <<<"$base_out"
apt_install "${NEED_APT[@]}"
# Debian's own python3 comes without pip (package python3-pip) and refuses pip installs into it
# (PEP 668: EXTERNALLY-MANAGED); this is a build machine, so they go into it all the same.
"$PY" -m pip --version >/dev/null 2>&1 || apt_install python3-pip
if [ -e "$("$PY" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')/EXTERNALLY-MANAGED" ]; then
  export PIP_BREAK_SYSTEM_PACKAGES=1
  log "$PY is externally managed (PEP 668, Debian's python3): pip installs into it with --break-system-packages"
fi
spent apt
if ! "$PY" -c 'import doit, docker, yaml' 2>/dev/null; then
  if [ "$DRY" = 1 ]; then
    log "would install Python packages (pip install -e .: doit, docker, PyYAML)"
    log "dry run: then \`python3 -m tasks needs$([ "$ALL" = 0 ] || echo ' --all')\` decides the rest"
    exit 0
  fi
  log "installing Python packages (pip install -e .: doit, docker, PyYAML)"
  "$PY" -m pip install -q --disable-pip-version-check -e .
fi
spent pip

# --- what the flavors need (or, with --all, the test suite): python3 -m tasks needs ------------
needs_args=(needs)
[ "$ALL" = 0 ] || needs_args+=(--all)
needs_out=$("$PY" -m tasks "${needs_args[@]}") ||
  die "python3 -m tasks ${needs_args[*]} failed (the problems above); fix the flavor files or KAIROS_FLAVORS/KAIROS_SHARD"
read_needs <<<"$needs_out"
log "needs ($([ "$ALL" = 1 ] && echo 'the test suite' || echo "flavors ${KAIROS_FLAVORS:-flavors/}${KAIROS_SHARD:+, shard $KAIROS_SHARD}")): $(echo "$needs_out" | paste -sd ';' | sed 's/;/; /g')"
apt_install "${NEED_APT[@]}"
spent apt

# systemd-measure >= 253 signs the UKIs' PCR policies without a TPM; bookworm's systemd is 252.
# systemd from bookworm-backports is unpacked (not installed: the host's systemd stays) and run
# through a wrapper with its own libsystemd-shared.
MEASURE_DIR=/opt/kairos/systemd-backports
measure_ok() { /usr/local/bin/systemd-measure --version 2>/dev/null | grep -Eq '^systemd (25[3-9]|2[6-9][0-9])'; }
if need_extra systemd-measure; then
  if measure_ok; then
    :
  elif [ "$DRY" = 1 ]; then
    log "would unpack systemd from bookworm-backports into $MEASURE_DIR (/usr/local/bin/systemd-measure)"
  else
    log "systemd-measure: unpacking systemd from bookworm-backports into $MEASURE_DIR"
    echo "deb http://deb.debian.org/debian bookworm-backports main" >/etc/apt/sources.list.d/kairos-bookworm-backports.list
    apt-get update -qq
    work=$(mktemp -d) && chmod 755 "$work"   # apt downloads as _apt
    (cd "$work" && apt-get download -qq systemd/bookworm-backports libsystemd-shared/bookworm-backports)
    rm -rf "$MEASURE_DIR.new" && mkdir -p "$MEASURE_DIR.new"
    for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$MEASURE_DIR.new"; done
    rm -rf "$work" "$MEASURE_DIR" && mv "$MEASURE_DIR.new" "$MEASURE_DIR"
    shared=$(dirname "$(find "$MEASURE_DIR" -name 'libsystemd-shared-*.so' | head -n 1)")
    printf '#!/bin/sh\n# systemd-measure of bookworm-backports (ci/setup.sh)\nLD_LIBRARY_PATH=%s exec %s "$@"\n' \
      "$shared" "$MEASURE_DIR/lib/systemd/systemd-measure" >/usr/local/bin/systemd-measure
    chmod 755 /usr/local/bin/systemd-measure
    measure_ok || die "systemd-measure from bookworm-backports does not run: $(/usr/local/bin/systemd-measure --version 2>&1 | head -n 3)"
  fi
  measure_ok && log "systemd-measure: $(/usr/local/bin/systemd-measure --version | head -n 1)"
fi
spent systemd-measure

# pyproject.toml's extras the needs name (`.[tools]`, `.[test,tools]`): installed when one of their
# requirements (or the project's own) is missing or not at its pinned version
pip_ok() {
  "$PY" - "$@" <<'PYEOF'
import importlib.metadata as md, re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + [r for e in sys.argv[1:] for r in project["optional-dependencies"][e]]:
    name, pin = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:==\s*([^;,\s]+))?", req).groups()
    try:
        if pin and md.version(name) != pin:
            sys.exit(1)
    except md.PackageNotFoundError:
        sys.exit(1)
PYEOF
}
if [ "$NEED_PIP" != . ]; then
  extras=${NEED_PIP#.[}
  IFS=, read -ra extras <<<"${extras%]}"
  if ! pip_ok "${extras[@]}"; then
    if [ "$DRY" = 1 ]; then
      log "would install Python packages (pip install -e '$NEED_PIP')"
    else
      log "installing Python packages (pip install -e '$NEED_PIP': pyproject.toml ${NEED_PIP#.})"
      "$PY" -m pip install -q --disable-pip-version-check -e "$NEED_PIP"
    fi
  fi
fi
spent pip

# Go tools at the versions tasks/needs.py pins, go install'ed into $GOBIN (default /usr/local/bin). One already on
# PATH is kept when `go version -m` reads that version from it; without go it is kept too, silently
# when its own version command names that version, else with a line saying so.
for spec in "${NEED_GO[@]}"; do
  module=${spec%@*} version=${spec##*@}
  name=${module##*/}
  if path=$(command -v "$name"); then
    if command -v go >/dev/null; then
      installed=$(go version -m "$path" 2>/dev/null | awk '$1 == "mod" {print $3; exit}')
      [ "$installed" != "$version" ] || continue
      log "$name: $path is ${installed:-of an unknown version}, want $version"
    else
      own=$({ timeout 30 "$path" version; timeout 30 "$path" -version; } 2>&1 || true)
      grep -qF -- "${version#v}" <<<"$own" ||
        log "$name: keeping $path (go is absent: its build version cannot be read or replaced; want $version)"
      continue
    fi
  fi
  if [ "$DRY" = 1 ]; then log "would go install $spec"; continue; fi
  command -v go >/dev/null || die "go is needed to install $name ($spec)"
  log "go install $spec (takes a few minutes)"
  GOBIN=${GOBIN:-/usr/local/bin} GOFLAGS=-mod=mod go install "$spec"
done
spent "go tools"

# npm tools (gitlab-ci-local, for the tests) at the versions tasks/needs.py pins, after the Node.js major
# they need (the `node>=N` word of the npm line): `npm install -g` only when a package is missing or
# at another version. Node.js: Debian's nodejs and npm only when there is no node at all (an existing
# one, e.g. NodeSource's, is kept); one older than needed is refused, not replaced.
node_min="" NPM_SPECS=()
for word in "${NEED_NPM[@]}"; do
  case $word in
    node'>='*) node_min=${word#node>=} ;;
    *) NPM_SPECS+=("$word") ;;
  esac
done
if [ ${#NPM_SPECS[@]} -gt 0 ]; then
  command -v node >/dev/null || apt_install nodejs npm
  if command -v node >/dev/null; then
    node_version=$(node --version 2>/dev/null || true)
    node_major=${node_version#v}
    node_major=${node_major%%.*}
    if ! [[ "$node_major" =~ ^[0-9]+$ ]] || [ "$node_major" -lt "${node_min:-0}" ]; then
      die "$(command -v node) is Node.js ${node_version:-of an unknown version}; ${NPM_SPECS[*]} needs Node.js >= $node_min (Debian 12's nodejs is 18): install Node.js $node_min or newer (e.g. NodeSource's nodejs package) and run again"
    fi
    command -v npm >/dev/null || die "npm is missing next to $(command -v node) (Node.js $node_version): install npm (Debian package npm, or with NodeSource's nodejs)"
  elif [ "$DRY" = 1 ]; then
    log "would check that Debian's nodejs is Node.js >= $node_min (it refuses an older one)"
  else
    die "no node on PATH after installing Debian's nodejs"
  fi
  for spec in "${NPM_SPECS[@]}"; do
    package=${spec%@*}
    if command -v npm >/dev/null &&  # lines `<global root>/<package>:<package>@<version>`
      npm ls -g --depth=0 --parseable --long "$package" 2>/dev/null | awk -F: -v s="$spec" '$2 == s {f = 1} END {exit !f}'; then
      continue
    fi
    if [ "$DRY" = 1 ]; then log "would npm install -g $spec"; continue; fi
    log "npm install -g $spec"
    npm install -g --no-fund --no-audit --loglevel=error "$spec" >/dev/null
  done
fi
spent npm

# --- services, always: the Docker engine and the local registry ------------------------------
if ! docker_ok; then
  [ -z "${DOCKER_HOST:-}" ] || die "DOCKER_HOST=$DOCKER_HOST does not answer"
  if [ "$DRY" = 1 ]; then
    log "would start dockerd (log: /var/log/kairos-dockerd.log)"
  else
    log "starting dockerd (log: /var/log/kairos-dockerd.log)"
    nohup dockerd >/var/log/kairos-dockerd.log 2>&1 &
    for _ in $(seq 1 60); do docker_ok && break; sleep 1; done
    if ! docker_ok; then
      tail -n 30 /var/log/kairos-dockerd.log >&2 || true
      die "dockerd did not come up within 60 s (log above)"
    fi
  fi
fi
if [ "$DRY" = 1 ]; then
  docker_ok && log "docker engine: answers"
else
  log "docker engine: $(/usr/bin/docker version --format '{{.Server.Version}}' 2>/dev/null)"
fi

registry_ok() { curl -fsS --max-time 5 http://127.0.0.1:5000/v2/ >/dev/null 2>&1; }
if ! registry_ok; then
  dir=$(realpath -m "${KAIROS_REGISTRY_DIR:-/var/lib/kairos-registry}")  # relative: to the project directory
  if [ "$DRY" = 1 ]; then
    log "would start the local registry on 127.0.0.1:5000 (storage $dir, log /var/log/kairos-registry.log)"
  else
    mkdir -p "$dir"
    cat >/etc/kairos-registry.yml <<YML
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
YML
    # drop blobs no manifest refers to any more (test sessions delete their manifests)
    docker-registry garbage-collect --delete-untagged /etc/kairos-registry.yml >/dev/null 2>&1 || true
    log "starting the local registry on 127.0.0.1:5000 (storage $dir, log /var/log/kairos-registry.log)"
    nohup docker-registry serve /etc/kairos-registry.yml >/var/log/kairos-registry.log 2>&1 &
    for _ in $(seq 1 30); do registry_ok && break; sleep 1; done
    if ! registry_ok; then
      tail -n 30 /var/log/kairos-registry.log >&2 || true
      die "the registry did not answer on 127.0.0.1:5000 within 30 s (log above)"
    fi
  fi
fi
registry_ok && log "registry: http://127.0.0.1:5000 ok"
spent services

# --- arm64 cross builds (issue #3): qemu-user-static through binfmt_misc -------------------
# arm64 images (rpi3/rpi4 and arm64 generic builds) are converted on amd64 hosts by running
# their binaries under qemu-aarch64-static. Debian registers it with fix_binary (F flag), so
# the host interpreter also serves containers. Idempotent: mounts binfmt_misc only when it is
# not mounted, enables qemu-aarch64 only when disabled, then proves that an arm64 ELF runs.
# Only when the needs name it (arm64 builds, or --all).
if need_extra arm64-binfmt && [ "$(uname -m)" != aarch64 ]; then
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    if [ "$DRY" = 1 ]; then
      log "would mount binfmt_misc on /proc/sys/fs/binfmt_misc"
    else
      log "mounting binfmt_misc on /proc/sys/fs/binfmt_misc"
      mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc ||
        die "cannot mount binfmt_misc (needed for arm64 builds); on a container host run: modprobe binfmt_misc"
    fi
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    if [ "$DRY" = 1 ]; then
      log "would enable qemu-aarch64 in binfmt_misc"
    else
      log "enabling qemu-aarch64 in binfmt_misc"
      update-binfmts --enable qemu-aarch64 || die "update-binfmts --enable qemu-aarch64 failed"
    fi
  fi
  if [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    # a 132-byte static arm64 ELF that exits with status 42 (movz x0,#42; movz x8,#93; svc #0)
    probe=$(mktemp /tmp/kairos-arm64-probe.XXXXXX)
    printf '\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00'\
'\x02\x00\xb7\x00\x01\x00\x00\x00\x78\x00\x40\x00\x00\x00\x00\x00'\
'\x40\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00'\
'\x00\x00\x00\x00\x40\x00\x38\x00\x01\x00\x00\x00\x00\x00\x00\x00'\
'\x01\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00'\
'\x00\x00\x40\x00\x00\x00\x00\x00\x00\x00\x40\x00\x00\x00\x00\x00'\
'\x84\x00\x00\x00\x00\x00\x00\x00\x84\x00\x00\x00\x00\x00\x00\x00'\
'\x00\x10\x00\x00\x00\x00\x00\x00'\
'\x40\x05\x80\xd2\xa8\x0b\x80\xd2\x01\x00\x00\xd4' >"$probe"
    chmod 755 "$probe"
    status=0; "$probe" || status=$?
    rm -f "$probe"
    [ "$status" = 42 ] || die "an arm64 binary does not run (status $status) although qemu-aarch64 is enabled in binfmt_misc"
    log "arm64 binaries run through qemu-aarch64 (binfmt_misc)"
  fi
fi
spent binfmt
print_times
[ "$DRY" = 0 ] || log "dry run: done, nothing was changed"
