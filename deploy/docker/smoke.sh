#!/usr/bin/env bash
# Smoke test of the container deployment: builds the image (on a base made locally with
# debootstrap, so nothing is pulled from a registry), starts docker-compose.yml's three members,
# writes through a multi-host URL while the primary's container is killed, checks that another
# member takes over with every acknowledged row, and that the old one rejoins as a replica.
# Prints "skipped: <reason>" and exits 0 where no Docker engine answers; under CI=true it
# prints "FAIL: ..." and exits 1 instead, so a green CI run means the smoke test ran.
#
# Usage: deploy/docker/smoke.sh
#   PGQ_SMOKE_FAULT=stop  stop the primary's container cleanly instead of killing it
#   PGQ_SMOKE_KEEP=1      leave the cluster running at the end (tear down with the printed command)
#   PGQ_SMOKE_LOGS=DIR    save every member's logs and the writer's record there, pass or fail
#   PGQ_DEBIAN_MIRROR=URL mirror for debootstrap (default: the host's apt mirror)
#   PGQ_SMOKE_BUILD=0     use the binaries already in target/debug instead of running cargo
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
base_image=${PGQ_BASE_IMAGE:-pgquorum-base:bookworm}
image=${PGQUORUM_IMAGE:-pgquorum:local}
fault=${PGQ_SMOKE_FAULT:-kill}
project=pgquorum-smoke
# Fixed in docker-compose.yml and the node configs.
bridge=pgq-docker0
subnet_prefix=172.30.57.1
members=(1 2 3)

now_ms() { date +%s%3N; }
secs() { awk -v ms="$1" 'BEGIN { printf "%.1f s", ms / 1000 }'; }
log() { printf '%s  %s\n' "$(date +%T)" "$*"; }
timings=()
timed() { timings+=("$(printf '%-40s %s' "$1" "$(secs "$2")")"); log "$1: $(secs "$2")"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# A skip: exit 0 with the reason, but fail under CI=true, where every test must run.
skip() {
  if [ "${CI:-}" = true ]; then
    echo "FAIL: the Docker smoke test cannot run: $1 (CI=true: a skip fails the run)" >&2
    exit 1
  fi
  echo "skipped: $1"
  exit 0
}

if ! command -v docker >/dev/null 2>&1; then
  skip "no docker command (install Docker: apt-get install docker.io)"
fi
if ! docker info >/dev/null 2>&1; then
  skip "no Docker engine answers (docker info failed; start it: systemctl start docker)"
fi
if docker compose version >/dev/null 2>&1; then
  compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose_cmd=(docker-compose)
else
  skip "neither \`docker compose\` nor docker-compose is installed (apt-get install docker-compose)"
fi
for tool in python3 $([ "${PGQ_SMOKE_BUILD:-1}" = 0 ] || echo cargo); do
  command -v "$tool" >/dev/null 2>&1 || { echo "FAIL: $tool is required" >&2; exit 1; }
done

compose() { "${compose_cmd[@]}" -p "$project" -f "$here/docker-compose.yml" "$@"; }
container() { echo "pgquorum-pg$1"; }

# Random per run: the cluster is gone at the end, and nothing else must know them.
PGQUORUM_SUPERUSER_PASSWORD=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
PGQUORUM_REPLICATION_PASSWORD=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
export PGQUORUM_SUPERUSER_PASSWORD PGQUORUM_REPLICATION_PASSWORD PGQUORUM_IMAGE=$image

work=$(mktemp -d "${TMPDIR:-/tmp}/pgq-smoke.XXXXXX")
export PGQUORUM_TLS_DIR=$work/tls
rootfs=""
ctx=""
rule_added=0
compose_created=0
writer_pid=""
passed=0

# Full logs go to a directory that outlives the run; the terminal gets each member's last
# lines without openraft's retry chatter, which fills any tail during an outage.
dump_logs() {
  local keep=$1 i c via
  for i in "${members[@]}"; do
    c=$(container "$i")
    docker logs -t "$c" >"$keep/$c.log" 2>&1 || true
    echo "===== $c (last 60 lines, openraft's lines left out; all: $keep/$c.log)"
    grep -v ' openraft' "$keep/$c.log" | tail -60
    # Postgres' own log lives in the volume, beside the data directory.
    if docker cp "$c:/var/lib/postgresql/15/pgquorum.log" "$keep/$c.postgres.log" >/dev/null 2>&1; then
      echo "===== $c: Postgres (last 20 lines; all: $keep/$c.postgres.log)"
      tail -20 "$keep/$c.postgres.log"
    fi
  done
  cp "$work/acked" "$work/writer.err" "$keep/" 2>/dev/null || true
  if [ -s "$work/writer.err" ]; then
    echo "===== writer's errors (last 10 lines)"
    tail -10 "$work/writer.err"
  fi
  if via=$(running_member 2>/dev/null); then
    echo "===== pgquorum list (via $via)"
    docker exec "$via" pgquorum list 2>&1 || true
  fi
  echo "logs kept in $keep"
}

teardown() {
  local rc=$?
  set +e
  [ -n "$writer_pid" ] && kill "$writer_pid" 2>/dev/null
  if [ "$compose_created" = 1 ]; then
    if [ "$rc" != 0 ]; then
      dump_logs "${PGQ_SMOKE_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/pgq-smoke-logs.XXXXXX")}"
    elif [ -n "${PGQ_SMOKE_LOGS:-}" ]; then
      mkdir -p "$PGQ_SMOKE_LOGS" && dump_logs "$PGQ_SMOKE_LOGS" >/dev/null
    fi
  fi
  if [ "$compose_created" = 1 ]; then
    if [ "${PGQ_SMOKE_KEEP:-}" = 1 ]; then
      echo "PGQ_SMOKE_KEEP=1: cluster left running; remove it with:"
      echo "  PGQUORUM_SUPERUSER_PASSWORD=x PGQUORUM_REPLICATION_PASSWORD=x PGQUORUM_TLS_DIR=x ${compose_cmd[*]} -p $project -f $here/docker-compose.yml down -v"
      [ "$rule_added" = 1 ] && echo "  iptables -D DOCKER-USER -i $bridge -o $bridge -j ACCEPT"
    else
      compose down -v --remove-orphans >/dev/null 2>&1
      [ "$rule_added" = 1 ] && as_root iptables -D DOCKER-USER -i "$bridge" -o "$bridge" -j ACCEPT
    fi
  fi
  # --one-file-system: never follow a mount that a failed debootstrap left behind.
  [ -n "$rootfs" ] && as_root rm -rf --one-file-system "$rootfs"
  [ -n "$ctx" ] && rm -rf "$ctx"
  rm -rf "$work"
  if [ "${#timings[@]}" -gt 0 ]; then
    echo "timings:"
    printf '  %s\n' "${timings[@]}"
  fi
  if [ "$rc" = 0 ] && [ "$passed" = 1 ]; then
    echo "PASS: docker smoke test"
  else
    echo "FAIL: docker smoke test (exit status $rc)"
    [ "$rc" = 0 ] && rc=1
  fi
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

fail() { echo "FAIL: $*" >&2; exit 1; }

# The host's own Debian mirror (it may be a local cache or proxy): the first apt source that
# serves the Debian suite itself, not -security or -updates, nor a third-party repository.
host_mirror() {
  local m
  m=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '
    function flush() { if (u != "" && s ~ /(^| )(bookworm|trixie|bullseye|stable)( |$)/ && found == "") found = u; u = ""; s = "" }
    /^[[:space:]]*$/ { flush(); next }
    /^URIs:/ { u = $2 }
    /^Suites:/ { $1 = ""; s = $0 " " }
    END { flush(); if (found != "") print found }')
  if [ -z "$m" ]; then
    m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '$1 == "deb" {
        i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
        if ($(i + 1) ~ /^(bookworm|trixie|bullseye|stable)$/) { print $i; exit } }')
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

build_base() {
  if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  fi
  local mirror
  mirror=${PGQ_DEBIAN_MIRROR:-$(host_mirror)}
  rootfs=$(as_root mktemp -d "${TMPDIR:-/var/tmp}/pgq-rootfs.XXXXXX")
  log "debootstrap bookworm from $mirror into $rootfs"
  # Postgres and tini at bootstrap time: the image build then needs no network. debootstrap
  # keeps services from starting in the chroot (policy-rc.d), so no stray postmaster appears.
  if ! as_root debootstrap --variant=minbase --include=postgresql-15,tini \
    bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1; then
    tail -30 "$work/debootstrap.log"
    fail "debootstrap failed"
  fi
  # Downloaded packages, package lists, docs and translations: a third of the tree, unused.
  as_root find "$rootfs/var/cache/apt/archives" "$rootfs/var/lib/apt/lists" \
    "$rootfs/usr/share/doc" "$rootfs/usr/share/man" "$rootfs/usr/share/locale" \
    -mindepth 1 -delete
  as_root rm -rf "$rootfs/etc/postgresql/15/main" "$rootfs/var/lib/postgresql/15/main"
  as_root tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$base_image" >/dev/null
  as_root rm -rf --one-file-system "$rootfs"
  rootfs=""
}

# Prints `name` of a member whose container runs, to run the CLI in.
running_member() {
  local i
  for i in "${members[@]}"; do
    if [ "$(docker inspect -f '{{.State.Running}}' "$(container "$i")" 2>/dev/null)" = true ]; then
      container "$i"
      return 0
    fi
  done
  return 1
}

# Reads the committed topology through the CLI inside a running member and sets:
# leader, epoch, primary (the member that runs as primary and is the committed one, or 0),
# replicas (ids running as replicas), sync (1 once a synchronous standby is committed).
state() {
  local via json
  leader=0 primary=0 replicas="" sync=0 epoch=0
  via=$(running_member) || return 1
  json=$(docker exec "$via" pgquorum list --output json 2>/dev/null) || return 1
  eval "$(python3 -c '
import json, sys
t = json.load(sys.stdin)
ms = t["members"]
prim = [m["id"] for m in ms if m["role"] == "primary" and m["assigned_primary"]]
reps = [str(m["id"]) for m in ms if m["role"] == "replica"]
sy = t.get("sync") or {}
print("leader=%d epoch=%d primary=%d replicas=\"%s\" sync=%d" % (
    t.get("leader_id") or 0, (t.get("primary") or {}).get("epoch", 0),
    prim[0] if len(prim) == 1 else 0, " ".join(reps),
    1 if sy.get("k", 0) > 0 and not sy.get("target") else 0))
' <<<"$json")"
}

# Names of the standbys that stream from member $1 (its pg_stat_replication).
streaming_from() {
  docker exec -u postgres "$(container "$1")" psql -XtAc \
    "SELECT string_agg(application_name, ' ' ORDER BY application_name) FROM pg_stat_replication WHERE state = 'streaming'" \
    2>/dev/null
}

sql() { docker exec -u postgres "$(container "$1")" psql -XtAq -v ON_ERROR_STOP=1 -c "$2"; }

# poll SECONDS COMMAND...: runs COMMAND until it succeeds (0) or time runs out (1).
poll() {
  local deadline=$(($(date +%s) + $1))
  shift
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}

# wait_for DESCRIPTION SECONDS COMMAND...: poll, or fail naming what did not happen.
wait_for() {
  local what=$1 limit=$2
  shift 2
  poll "$limit" "$@" || fail "$what: not within $limit s"
}

# One primary, the two others streaming from it, and a committed synchronous standby (before
# that, commits do not wait for a standby and a failover may lose them).
healthy() {
  state || return 1
  [ "$primary" != 0 ] && [ "$sync" = 1 ] && [ "$(wc -w <<<"$replicas")" = 2 ] || return 1
  local others="" i
  for i in "${members[@]}"; do [ "$i" = "$primary" ] || others="$others pg$i"; done
  [ "$(streaming_from "$primary")" = "${others# }" ]
}

acked() { if [ -f "$work/acked" ]; then wc -l <"$work/acked"; else echo 0; fi; }

start_writer() {
  # A row counts as acknowledged once psql has printed its id; the line also names the member
  # that took it. The member that took the last write is tried first, so the dead one costs a
  # connect timeout once rather than on every row. tcp_user_timeout and `timeout`: a killed
  # container sends no reset, so an INSERT in flight would otherwise wait for minutes.
  docker exec -e "hosts=${subnet_prefix}1 ${subnet_prefix}2 ${subnet_prefix}3" "$(container "$1")" bash -c '
    export PGPASSWORD=$PGQUORUM_SUPERUSER_PASSWORD
    rm -f /tmp/pgq-smoke-stop
    first=""
    while [ ! -e /tmp/pgq-smoke-stop ]; do
      list=${first:+$first:5432}
      for h in $hosts; do [ "$h" = "$first" ] || list=${list:+$list,}$h:5432; done
      url="postgresql://postgres@$list/postgres?target_session_attrs=read-write&connect_timeout=2&tcp_user_timeout=2000"
      if out=$(timeout 10 psql "$url" -XqtA -F " " \
          -c "INSERT INTO smoke DEFAULT VALUES RETURNING id, host(inet_server_addr())"); then
        read -r id first <<<"$out"
        echo "$id $(date +%s%3N) $first"
      fi
    done' >>"$work/acked" 2>"$work/writer.err" &
  writer_pid=$!
}

stop_writer() {
  docker exec "$(container "$1")" touch /tmp/pgq-smoke-stop
  wait_for "the writer to stop" 30 bash -c "! kill -0 $writer_pid 2>/dev/null"
  wait "$writer_pid" || true
  writer_pid=""
}

# -- 1. the base image (cached in the local image store once built)
if docker image inspect "$base_image" >/dev/null 2>&1; then
  log "base image $base_image present"
else
  t=$(now_ms)
  build_base
  timed "debootstrap + import of the base" $(($(now_ms) - t))
fi

# -- 2. binaries and image
if [ "${PGQ_SMOKE_BUILD:-1}" != 0 ]; then
  t=$(now_ms)
  log "cargo build --locked --bins"
  (cd "$repo" && cargo build --locked --bins)
  timed "cargo build" $(($(now_ms) - t))
fi

t=$(now_ms)
target=${CARGO_TARGET_DIR:-$repo/target}
case $target in /*) ;; *) target=$repo/$target ;; esac
ctx=$(mktemp -d "${TMPDIR:-/tmp}/pgq-image.XXXXXX")
mkdir "$ctx/bin"
cp "$here/Dockerfile" "$ctx/"
for b in pgquorum pgq-guard; do
  [ -x "$target/debug/$b" ] || fail "$target/debug/$b is missing (cargo build --locked --bins)"
  # Debug info is most of a debug binary; the symbols stay, so backtraces still name functions.
  objcopy --strip-debug "$target/debug/$b" "$ctx/bin/$b" 2>/dev/null || cp "$target/debug/$b" "$ctx/bin/$b"
done
old_image=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
docker build -q --build-arg "BASE=$base_image" -t "$image" "$ctx" >/dev/null
new_image=$(docker image inspect -f '{{.Id}}' "$image")
# Only the image this script replaced, never other dangling images on the host.
if [ -n "$old_image" ] && [ "$old_image" != "$new_image" ]; then
  docker rmi "$old_image" >/dev/null 2>&1 || true
fi
rm -rf "$ctx"
ctx=""
timed "image build" $(($(now_ms) - t))

# A CA, the three members' certificates and a token, for this run only.
"$target/debug/pgquorum" cert init "$PGQUORUM_TLS_DIR" --cluster docker >/dev/null
for i in 1 2 3; do
  "$target/debug/pgquorum" cert issue node "$i" --dir "$PGQUORUM_TLS_DIR" >/dev/null
done
"$target/debug/pgquorum" cert token "$PGQUORUM_TLS_DIR/token" >/dev/null

# -- 3. the cluster
t=$(now_ms)
compose down -v --remove-orphans >/dev/null 2>&1 || true
compose_created=1
compose up --no-start
# With the FORWARD policy at DROP (br_netfilter hands bridged frames to iptables), members on
# one bridge reach each other only through an accept rule; Docker adds one per bridge unless
# its iptables management is off.
if command -v iptables >/dev/null 2>&1 \
  && as_root iptables -S FORWARD 2>/dev/null | grep -qx -- '-P FORWARD DROP' \
  && ! as_root iptables -C FORWARD -i "$bridge" -o "$bridge" -j ACCEPT 2>/dev/null; then
  as_root iptables -I DOCKER-USER -i "$bridge" -o "$bridge" -j ACCEPT
  rule_added=1
  log "iptables: accepting traffic within $bridge (rule removed at the end)"
fi
compose start >/dev/null
log "waiting for one primary, two streaming replicas and a synchronous standby"
wait_for "cluster ready" 180 healthy
docker exec "$(container "$primary")" pgquorum list
timed "cluster up (start to healthy)" $(($(now_ms) - t))
first_primary=$primary

# Leadership normally moves off the primary's node, which makes the failover one lease; a
# cluster where it stays still fails over (an election first), so this wait is not a check.
handed_off() { healthy && [ "$leader" != "$primary" ]; }
poll 20 handed_off || log "note: the Raft leader stayed on the primary's node"
wait_for "cluster healthy before the fault" 60 healthy
[ "$primary" = "$first_primary" ] \
  || log "note: the primary moved from pg$first_primary to pg$primary before any fault (see the sidecars' logs)"

# -- 4. failover under writes
old=$primary
for i in "${members[@]}"; do [ "$i" = "$old" ] || { writer=$i; break; }; done
: >"$work/acked"
sql "$old" "CREATE TABLE smoke (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())"
start_writer "$writer"
wait_for "100 acknowledged rows before the fault" 60 bash -c "[ \$(wc -l <'$work/acked') -ge 100 ]"
# A primary that moved under the writes (a healthy primary should not) is noted, and the
# fault goes to the one that runs now, with the writer on another member.
wait_for "a healthy cluster just before the fault" 60 healthy
if [ "$primary" != "$old" ]; then
  log "note: the primary moved from pg$old to pg$primary under the writes, before any fault (see the sidecars' logs)"
  old=$primary
  if [ "$writer" = "$old" ]; then
    stop_writer "$writer"
    for i in "${members[@]}"; do [ "$i" = "$old" ] || { writer=$i; break; }; done
    n=$(acked)
    start_writer "$writer"
    wait_for "writes from pg$writer" 60 bash -c "[ \$(wc -l <'$work/acked') -ge $((n + 20)) ]"
  fi
fi
docker exec "$(container "$writer")" pgquorum list
before=$(acked)
t=$(now_ms)
log "docker $fault $(container "$old") (primary pg$old epoch $epoch, Raft leader pg$leader, $before rows acknowledged)"
docker "$fault" "$(container "$old")" >/dev/null
new_primary() { state && [ "$primary" != 0 ] && [ "$primary" != "$old" ]; }
wait_for "a new primary" 60 new_primary
promoted=$(($(now_ms) - t))
new=$primary
new_ip=${subnet_prefix}$new
wait_for "20 writes acknowledged by the new primary" 60 \
  bash -c "[ \$(awk -v ip=$new_ip '\$3 == ip' '$work/acked' | wc -l) -ge 20 ]"
stop_writer "$writer"
docker exec "$(container "$writer")" pgquorum list
# The writer is sequential, so the file is in acknowledgement order: the outage runs from the
# old primary's last acknowledgement to the new one's first, and once the new primary has
# acknowledged a row, no other member may acknowledge one (that would be two primaries).
read -r outage stray < <(awk -v old="${subnet_prefix}$old" -v new="$new_ip" '
  $3 == old { last = $2 }
  $3 == new && !first { first = $2 }
  first && $3 != new { stray++ }
  END { print first - last, stray + 0 }' "$work/acked")
timed "failover (fault to new primary)" "$promoted"
timed "write outage (last ack to next ack)" "$outage"

awk '{ print $1 }' "$work/acked" | sort >"$work/acked.ids"
sql "$new" "SELECT id FROM smoke" | sort >"$work/present.ids"
total=$(wc -l <"$work/acked.ids")
missing=$(comm -23 "$work/acked.ids" "$work/present.ids" | wc -l)
log "pg$new is primary; $total rows acknowledged ($before before the fault), $missing missing on pg$new, $(wc -l <"$work/present.ids") present"
[ "$missing" = 0 ] || fail "$missing acknowledged rows are missing on the new primary: $(comm -23 "$work/acked.ids" "$work/present.ids" | head -10 | tr '\n' ' ')"
[ "$stray" = 0 ] || fail "$stray rows were acknowledged by another member after pg$new had taken writes"

# -- 5. the old primary rejoins
t=$(now_ms)
log "docker start $(container "$old")"
docker start "$(container "$old")" >/dev/null
rows_on() { sql "$1" "SELECT count(*) FROM smoke" 2>/dev/null; }
rejoined() {
  healthy && [ "$primary" != "$old" ] && [ "$(rows_on "$old")" = "$(rows_on "$primary")" ]
}
wait_for "pg$old rejoining as a streaming replica with every row" 120 rejoined
docker exec "$(container "$old")" pgquorum list
timed "rejoin (start to streaming, caught up)" $(($(now_ms) - t))
[ "$primary" = "$new" ] || log "note: the primary moved from pg$new to pg$primary during the rejoin (see the sidecars' logs)"
for i in "$primary" "$old"; do
  sql "$i" "SELECT id FROM smoke" | sort >"$work/present.ids"
  missing=$(comm -23 "$work/acked.ids" "$work/present.ids" | wc -l)
  [ "$missing" = 0 ] || fail "$missing acknowledged rows are missing on pg$i after the rejoin"
done
log "every acknowledged row is on the primary pg$primary and on the rejoined pg$old"

passed=1
