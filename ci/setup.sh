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

APT_PACKAGES=(docker.io docker-registry mmdebstrap arch-test squashfs-tools tar xz-utils curl ca-certificates
  grub-common grub-pc-bin grub-efi-amd64-bin xorriso mtools dosfstools e2fsprogs fdisk ipxe
  qemu-system-x86 qemu-system-arm qemu-efi-aarch64 ovmf qemu-user-static binfmt-support zstd shellcheck git socat efitools sbsigntool
  systemd-boot-efi binutils cpio faketime swtpm libtss2-esys-3.0.2-0 libtss2-mu0 libtss2-rc0)
docker_ok() {
  if [ -n "${DOCKER_HOST:-}" ]; then
    /usr/bin/docker info >/dev/null 2>&1
  else
    curl -fsS --max-time 5 --unix-socket /var/run/docker.sock http://localhost/_ping >/dev/null 2>&1
  fi
}

if docker_ok && docker buildx version >/dev/null 2>&1; then
  # an engine already answers and the docker CLI has buildx (e.g. a GitHub runner's
  # preinstalled Docker): keep those packages; Debian's docker.io would conflict with them
  APT_PACKAGES=("${APT_PACKAGES[@]/docker.io/}")
fi
missing=()
for p in "${APT_PACKAGES[@]}"; do
  [ -n "$p" ] || continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# systemd-measure >= 253 signs the UKIs' PCR policies without a TPM; bookworm's systemd is 252.
# systemd from bookworm-backports is unpacked (not installed: the host's systemd stays) and run
# through a wrapper with its own libsystemd-shared.
MEASURE_DIR=/opt/kairos/systemd-backports
measure_ok() { /usr/local/bin/systemd-measure --version 2>/dev/null | grep -Eq '^systemd (25[3-9]|2[6-9][0-9])'; }
if ! measure_ok; then
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
log "systemd-measure: $(/usr/local/bin/systemd-measure --version | head -n 1)"

PY=${PYTHON:-python3}
if ! "$PY" -c 'import doit, docker, yaml, pytest, xdist, hypothesis, cryptography' 2>/dev/null \
    || ! command -v syft >/dev/null || ! command -v trivy >/dev/null || ! command -v virt-fw-vars >/dev/null; then
  log "installing Python packages (pyproject.toml [test,tools]: doit, docker, syft, trivy, ...)"
  "$PY" -m pip install -q --disable-pip-version-check -e '.[test,tools]'
fi

# cosign, grype, actionlint, crane: go install at pinned versions (into /usr/local/bin)
GO_TOOLS=(
  "cosign v2.6.5 github.com/sigstore/cosign/v2/cmd/cosign"
  "grype v0.110.0 github.com/anchore/grype/cmd/grype"  # newer ones need modules the proxy refuses
  "actionlint v1.7.7 github.com/rhysd/actionlint/cmd/actionlint"  # lints ci/github-actions.yml in the tests
  "crane v0.22.1 github.com/google/go-containerregistry/cmd/crane"  # unpacks -img carriers in the tests
)
for entry in "${GO_TOOLS[@]}"; do
  read -r name version module <<<"$entry"
  installed=""
  if command -v "$name" >/dev/null && command -v go >/dev/null; then
    installed=$(go version -m "$(command -v "$name")" 2>/dev/null | awk '$1 == "mod" {print $3; exit}')
  fi
  if [ "$installed" != "$version" ]; then
    command -v go >/dev/null || die "go is needed to install $name ($module@$version)"
    log "go install $module@$version (takes a few minutes)"
    GOBIN=/usr/local/bin GOFLAGS=-mod=mod go install "$module@$version"
  fi
done

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
log "registry: http://127.0.0.1:5000 ok"

# --- arm64 cross builds (issue #3): qemu-user-static through binfmt_misc -------------------
# arm64 images (rpi3/rpi4 and arm64 generic builds) are converted on amd64 hosts by running
# their binaries under qemu-aarch64-static. Debian registers it with fix_binary (F flag), so
# the host interpreter also serves containers. Idempotent: mounts binfmt_misc only when it is
# not mounted, enables qemu-aarch64 only when disabled, then proves that an arm64 ELF runs.
if [ "$(uname -m)" != aarch64 ]; then
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    log "mounting binfmt_misc on /proc/sys/fs/binfmt_misc"
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc ||
      die "cannot mount binfmt_misc (needed for arm64 builds); on a container host run: modprobe binfmt_misc"
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    log "enabling qemu-aarch64 in binfmt_misc"
    update-binfmts --enable qemu-aarch64 || die "update-binfmts --enable qemu-aarch64 failed"
  fi
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
