#!/usr/bin/env bash
# Benchmark (prints numbers; not a test): the README's first command on a fresh Debian 12 machine.
#
#   bash bench/fresh-machine.sh [COMMIT]     (default HEAD; as root, needs bash ci/setup.sh first)
#
# The fresh machine is a container (all capabilities this host has) of the Debian 12 minbase rootfs (the tests' cached
# mmdebstrap tarball) plus python3, as a cloud image brings it; its own dockerd (storage on a
# scratch directory of the host), its own registry on its own 127.0.0.1:5000, and the network of
# Docker's bridge (Debian's mirror, PyPI). In it, a clone of COMMIT runs
#   bash ci/setup.sh && python3 -m doit
# and the script prints setup's time per part (its `setup: times:` line), the build's time, the
# boots' seconds to the login prompt (from <stem>-boot.json), the build without them, and the
# total. Everything it made (container, image, scratch directory) is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

commit=$(git rev-parse "${1:-HEAD}")
tar=/var/tmp/kairos-test-cache/bookworm-minbase-amd64.tar
[ -f "$tar" ] || { echo "fresh-machine: $tar is missing: run the test suite once (it builds it)" >&2; exit 2; }
id=kairos-bench-fresh-$$
scratch=$(mktemp -d /var/tmp/kairos-fresh.XXXXXX)
cleanup() {
  docker rm -f "$id" >/dev/null 2>&1 || true
  docker rmi -f "$id:bookworm" >/dev/null 2>&1 || true
  rm -rf "$scratch"
  find /sys/fs/cgroup -depth -type d -name kairos-fresh -exec rmdir {} + 2>/dev/null || true
}
trap cleanup EXIT

git clone -q . "$scratch/src" && git -C "$scratch/src" checkout -q "$commit"
mkdir "$scratch/ctx" "$scratch/docker"
ln "$tar" "$scratch/ctx/rootfs.tar" 2>/dev/null || cp "$tar" "$scratch/ctx/rootfs.tar"
cat >"$scratch/ctx/Dockerfile" <<'EOF'
FROM scratch
ADD rootfs.tar /
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 >/dev/null \
    && rm -rf /var/lib/apt/lists/*
CMD ["sleep", "infinity"]
EOF
echo "fresh-machine: building the machine image (Debian 12 minbase + python3; not timed)"
/usr/bin/docker build -q -t "$id:bookworm" "$scratch/ctx" >/dev/null
# The host's CA bundle, for the network's sake (where HTTPS goes through a proxy with its own CA,
# as here, a fresh machine of this network trusts that CA too); pip and Python read it from these.
trust=()
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  trust=(-v /etc/ssl/certs/ca-certificates.crt:/etc/kairos-host-ca.crt:ro)
  for var in PIP_CERT SSL_CERT_FILE REQUESTS_CA_BUNDLE CURL_CA_BUNDLE; do trust+=(-e "$var=/etc/kairos-host-ca.crt"); done
fi
# Not --privileged: that asks for every capability, and this machine's bounding set lacks
# CAP_SYS_RESOURCE. All the others, no seccomp/AppArmor profile, the host's cgroup tree (the
# inner dockerd puts its containers under /kairos-fresh in it) and a writable /sys do the same.
docker run -d --name "$id" --cap-add ALL --cap-drop SYS_RESOURCE --security-opt seccomp=unconfined \
  --security-opt apparmor=unconfined --security-opt systempaths=unconfined -v /sys/fs/cgroup:/sys/fs/cgroup \
  -v "$scratch/docker:/var/lib/docker" -v "$scratch/src:/src:ro" "${trust[@]}" "$id:bookworm" >/dev/null
docker exec "$id" sh -c 'mount -o remount,rw /sys && mkdir -p /etc/docker &&
  echo "{\"cgroup-parent\": \"/kairos-fresh\"}" >/etc/docker/daemon.json'

echo "fresh-machine: bash ci/setup.sh && python3 -m doit in a clone of ${commit:0:12} (minutes)"
docker exec "$id" bash -c 'cp -a /src /root/kairos && cd /root/kairos &&
  s=$SECONDS; bash ci/setup.sh >/root/setup.log 2>&1 || { tail -n 40 /root/setup.log; exit 1; }; echo "setup_s=$((SECONDS - s))" >/root/times
  s=$SECONDS; python3 -m doit >/root/doit.log 2>&1 || { tail -n 40 /root/doit.log; exit 1; }; echo "build_s=$((SECONDS - s))" >>/root/times' \
  || { echo "fresh-machine: the run failed (above)" >&2; exit 1; }

docker exec "$id" cat /root/times /root/setup.log >"$scratch/report"
docker exec "$id" sh -c 'cat /root/kairos/outputs/*/*-boot.json' >"$scratch/boots" || true
python3 - "$scratch/report" "$scratch/boots" <<'EOF'
import json, re, sys
report = open(sys.argv[1]).read()
times = dict(re.findall(r"^(\w+_s)=(\d+)$", report, re.M))
setup, build = int(times["setup_s"]), int(times["build_s"])
parts = re.search(r"^setup: times: (.*)$", report, re.M)
decoder, text, boots = json.JSONDecoder(), open(sys.argv[2]).read(), []
while text.strip():
    doc, end = decoder.raw_decode(text.lstrip())
    boots += doc["boots"]
    text = text.lstrip()[end:]
booted = sum(b["seconds"] for b in boots)
print(f"set-up (bash ci/setup.sh)        {setup:5d} s   ({parts.group(1) if parts else 'no times line'})")
print(f"build (python3 -m doit)          {build:5d} s")
each = ", ".join("%s %.0f s" % (b["firmware"], b["seconds"]) for b in boots)
print(f"  of it boots to the login prompt {booted:5.0f} s   ({each})")
print(f"clone to artifacts, no boots     {setup + build - booted:5.0f} s")
print(f"clone to artifacts, with boots   {setup + build:5d} s")
EOF
