#!/usr/bin/env bash
# Demo: start a local three-member pgquorum group, kill the Raft leader with SIGKILL, watch a new
# leader take over, bring the old one back as a follower, then stop everything.
# Usage: deploy/demo.sh [DIR]   (default DIR: ./demo-cluster, removed at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-./demo-cluster}
cargo build --release --locked -p pgquorum-cli
pgq=./target/release/pgquorum
trap '$pgq local down --dir "$dir" >/dev/null 2>&1 || true; [ -z "${1:-}" ] && rm -rf "$dir"' EXIT

echo "== starting three sidecars"
$pgq local up --nodes 3 --dir "$dir"
endpoints=$(python3 -c 'import json,sys; print(",".join(n["api_addr"] for n in json.load(open(sys.argv[1]))["nodes"]))' "$dir/cluster.json")
export PGQUORUM_ENDPOINTS=$endpoints

echo; echo "== committing a configuration change through the leader"
$pgq config set lease_ms=3000 | head -1

leader=$($pgq list --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader_id"])')
pid=$(cat "$dir/n$leader/sidecar.pid")
echo; echo "== kill -9 of the leader n$leader (pid $pid)"
start=$(date +%s%N)
kill -9 "$pid"
while true; do
  new=$($pgq list --output json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader_id"] or 0)' 2>/dev/null || echo 0)
  if [ "$new" != 0 ] && [ "$new" != "$leader" ]; then break; fi
  sleep 0.1
done
echo "new leader n$new after $(( ($(date +%s%N) - start) / 1000000 )) ms"
$pgq list

echo; echo "== restarting n$leader: it rejoins as a follower"
$pgq local up --dir "$dir" | tail -n +4 | head -5
echo; echo "demo done; stopping"
