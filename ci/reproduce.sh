#!/usr/bin/env bash
# Reproduce one CI job of the shipped workflows (ci/github-actions.yml, ci/gitlab-ci.yml)
# on this machine, step by step as the runner does it:
#
#   1. a fresh clone of SOURCE into WORK/checkout (always the same path, as on a CI
#      runner: the doit DB records absolute paths)
#   2. restore the cache: CACHE/state -> .state, CACHE/outputs -> outputs (if present)
#   3. --fresh-engine: remove from the Docker engine every image the restored state
#      names (converted images, bases, kairos-init, carriers: `python3 -m tasks images`),
#      so, like a new runner's daemon, it can only get them from the registry
#   4. python3 -m doit [flavors=...] [shard=...] [DOIT_ARGS...]
#   5. save .state and outputs back into CACHE (also after a failed run: doit records
#      only tasks that completed, so a partial state is a valid cache)
#
# It prints which build actions ran (every executed task but the always-run `preflight`
# and `resolve:*`) and exits with doit's status. Needs what the pipeline needs for the
# flavors it builds (KAIROS_FLAVORS=... bash ci/setup.sh, or bash ci/setup.sh --all) and git.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: ci/reproduce.sh --cache DIR [options] [SOURCE] [-- DOIT_ARGS...]

Reproduce one CI job: fresh clone of SOURCE (default: this repository's committed
HEAD), restore the cache directory, optionally empty the Docker engine of the
pipeline's images, run doit, save the cache.

options:
  --cache DIR       cache directory holding state/ and outputs/ (created when missing)
  --flavors PATHS   flavor files or directories, relative to the clone (doit's flavors=)
  --shard I/N       build only shard I of N (doit's shard=)
  --fresh-engine    before the run, remove every image the restored state names from
                    the engine, as on a new CI runner (they come back from the registry)
  --work DIR        where the clone goes (default /var/tmp/kairos-ci-reproduce)
  -h, --help        this text

Example: a second run with a restored cache and an emptied engine builds nothing:
  ci/reproduce.sh --cache /var/tmp/kcache
  ci/reproduce.sh --cache /var/tmp/kcache --fresh-engine
EOF
}

die() { echo "reproduce: error: $*" >&2; exit 2; }
log() { echo "reproduce: $*"; }

here=$(cd "$(dirname "$0")/.." && pwd)
cache="" flavors="" shard="" fresh=0 work=/var/tmp/kairos-ci-reproduce source="$here"
doit_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cache) [ $# -ge 2 ] || die "--cache needs a directory"; cache=$2; shift 2 ;;
    --flavors) [ $# -ge 2 ] || die "--flavors needs a path"; flavors=$2; shift 2 ;;
    --shard) [ $# -ge 2 ] || die "--shard needs I/N"; shard=$2; shift 2 ;;
    --work) [ $# -ge 2 ] || die "--work needs a directory"; work=$2; shift 2 ;;
    --fresh-engine) fresh=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; doit_args=("$@"); break ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) source=$1; shift ;;
  esac
done
[ -n "$cache" ] || { usage >&2; die "--cache DIR is required"; }
command -v git >/dev/null || die "git is needed (apt-get install git)"
mkdir -p "$cache" "$work" || die "cannot create $cache or $work"
cache=$(cd "$cache" && pwd) work=$(cd "$work" && pwd)
checkout=$work/checkout

# 1. fresh clone
rm -rf "$checkout"
git clone --quiet --no-hardlinks "$source" "$checkout" || die "cannot clone $source"
log "cloned $source at $(git -C "$checkout" rev-parse --short HEAD) into $checkout"

# 2. restore the cache
for d in state outputs; do
  target=$checkout/$([ "$d" = state ] && echo .state || echo outputs)
  if [ -d "$cache/$d" ]; then
    cp -a "$cache/$d" "$target"
    log "restored $d ($(du -sh "$target" | cut -f1)) from $cache/$d"
  else
    log "no $d in $cache: cold start"
  fi
done

cd "$checkout"
export KAIROS_STATE=$checkout/.state KAIROS_OUTPUTS=$checkout/outputs
select=()
[ -z "$flavors" ] || select+=(--flavors "$flavors")
[ -z "$shard" ] || select+=(--shard "$shard")

# 3. an engine without the pipeline's images
if [ "$fresh" = 1 ]; then
  refs=$(python3 -m tasks images "${select[@]}") || die "cannot list the images of the state"
  removed=0
  while read -r ref; do
    [ -n "$ref" ] || continue
    if docker image inspect "$ref" >/dev/null 2>&1; then
      docker image rm --force "$ref" >/dev/null 2>&1 && removed=$((removed + 1))
    fi
  done <<<"$refs"
  log "fresh engine: removed $removed image reference(s) the state names"
fi

# 4. the CI job's doit run
vars=()
[ -z "$flavors" ] || vars+=("flavors=$flavors")
[ -z "$shard" ] || vars+=("shard=$shard")
log "python3 -m doit ${vars[*]} ${doit_args[*]}"
status=0
python3 -m doit "${vars[@]}" "${doit_args[@]}" 2>&1 | tee "$work/doit.log" || status=${PIPESTATUS[0]}

# 5. save the cache (replace it as a whole; the old copy goes only once the new one is complete)
for d in state outputs; do
  src=$checkout/$([ "$d" = state ] && echo .state || echo outputs)
  [ -d "$src" ] || continue
  rm -rf "$cache/.$d.new" "$cache/.$d.old"
  cp -a "$src" "$cache/.$d.new"
  [ ! -d "$cache/$d" ] || mv "$cache/$d" "$cache/.$d.old"
  mv "$cache/.$d.new" "$cache/$d"
  rm -rf "$cache/.$d.old"
done
log "saved state and outputs to $cache"

actions=$(grep '^\.  ' "$work/doit.log" | sed 's/^\.  //' | grep -v -e '^preflight$' -e '^resolve:' || true)
log "build actions: $(printf '%s' "$actions" | grep -c . || true)"
[ -z "$actions" ] || printf '%s\n' "$actions" | sed 's/^/reproduce:   /'
log "doit exit status: $status"
exit "$status"
