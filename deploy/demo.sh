#!/usr/bin/env bash
# Demo: a local three-member pgquorum cluster with real PostgreSQL. It writes through a
# multi-host URL, crashes the primary's host (kill -9 of its sidecar and of its Postgres),
# shows the new primary taking the writes, then brings the old member back as a replica.
# Usage: deploy/demo.sh [DIR]   (default DIR: /tmp/pgquorum-demo, removed at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/tmp/pgquorum-demo}
keep=${1:+yes}
cargo build --release --locked -p pgquorum-cli
pgq=$PWD/target/release/pgquorum
cleanup() {
  "$pgq" local down --dir "$dir" >/dev/null 2>&1 || true
  [ -n "$keep" ] || rm -rf "$dir"
}
trap cleanup EXIT

echo "== starting three sidecars; they choose a primary, initdb it and clone two replicas"
"$pgq" local up --nodes 3 --dir "$dir" | tee "$dir.up"
url=$(grep -o "postgresql://[^']*" "$dir.up")
# `local up` made a cluster CA, member certificates and an operator certificate under
# $dir/tls: the CLI below talks mutual TLS as that operator.
eval "$(grep '^export PGQUORUM_' "$dir.up")"
rm -f "$dir.up"
echo "== the CLI authenticates with $PGQUORUM_CERT_FILE; without credentials it is refused:"
env -u PGQUORUM_CERT_FILE -u PGQUORUM_KEY_FILE "$pgq" pause 2>&1 | sed 's/^/   /' || true

echo; echo "== writing through $url"
psql "$url" -qc "CREATE TABLE demo (id serial PRIMARY KEY, at timestamptz DEFAULT now(), note text)"
psql "$url" -qc "INSERT INTO demo (note) VALUES ('before the crash')"

echo; echo "== waiting for a committed synchronous standby and Raft leadership apart from the primary"
for _ in $(seq 1 200); do
  if "$pgq" list --output json 2>/dev/null | python3 -c '
import json, sys
t = json.load(sys.stdin)
ok = (t.get("sync") or {}).get("k", 0) > 0 and not (t.get("sync") or {}).get("target") \
    and t["leader_id"] not in (None, t["primary"]["node_id"])
sys.exit(0 if ok else 1)'; then break; fi
  sleep 0.1
done
"$pgq" list
primary=$("$pgq" list --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)["primary"]["node_id"])')
# Every member serves HTTP health checks on loopback (`local up` printed their URLs), as a load
# balancer or the router reads them: /primary is 200 on the writable primary only.
http_of() { "$pgq" list --output json | python3 -c 'import json,sys; print(next(m["http_endpoint"] for m in json.load(sys.stdin)["members"] if m["id"] == int(sys.argv[1])))' "$1"; }
replica=$(( primary % 3 + 1 ))
echo; echo "== the primary's health check, then a replica's:"
if command -v curl >/dev/null 2>&1; then
  for id in "$primary" "$replica"; do
    echo "\$ curl http://$(http_of "$id")/primary   # n$id"
    curl -s -w '   -> HTTP %{http_code}\n' "http://$(http_of "$id")/primary" || true
  done
else
  echo "   (no curl here: apt-get install curl to see them)"
fi
postmaster=$(head -1 "$dir/n$primary/pgdata/postmaster.pid")
group=$(ps -o pgid= -p "$postmaster" | tr -d ' ')
echo; echo "== host crash of the primary n$primary: kill -9 of its sidecar and its Postgres"
start=$(date +%s%N)
kill -9 "$(cat "$dir/n$primary/sidecar.pid")"
kill -9 -- "-$group"
until psql "$url" -qtAc "INSERT INTO demo (note) VALUES ('after the crash') RETURNING 'ok'" 2>/dev/null | grep -q ok; do
  sleep 0.1
done
echo "writes succeed again after $(( ($(date +%s%N) - start) / 1000000 )) ms"
"$pgq" list

echo; echo "== restarting n$primary: it rewinds and rejoins as a replica of the new primary"
"$pgq" local up --dir "$dir" | sed -n '/^cluster/,/^$/p'
psql "$url" -c "SELECT id, note FROM demo ORDER BY id"
"$pgq" list --output json | python3 -c 'import json,sys; [print("history: epoch", h["epoch"], "->", "n%d" % h["to"], "-", h["reason"]) for h in json.load(sys.stdin)["history"]]'
echo "demo done; stopping the cluster"
