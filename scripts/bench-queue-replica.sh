#!/usr/bin/env bash
# Queue actions on a master alone, then on a master with one replica (the hub then WAITs for the
# replica after every queue transition): `hub-bench queue` against a hub at its defaults.
#
#   scripts/bench-queue-replica.sh [CLIENTS] [ACTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${1:-32}
ACTIONS=${2:-300}
MASTER=${MASTER_PORT:-6440}
REPLICA=${REPLICA_PORT:-6441}
HUB=${HUB_PORT:-4740}
cargo build --release -q --features bench --bins
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; pids=(); }
trap cleanup EXIT
trap 'exit 143' TERM INT
redis() { redis-server --port "$1" --save "" --appendonly no --loglevel warning --dir /tmp --dbfilename "bench-$1.rdb" "${@:2}" & pids+=("$!"); }
for mode in alone replica; do
  redis "$MASTER"
  [ "$mode" = replica ] && redis "$REPLICA" --replicaof 127.0.0.1 "$MASTER"
  sleep 0.5
  env PORT="$HUB" BIND_ADDR=127.0.0.1 REDIS_URL="redis://127.0.0.1:$MASTER" RUST_LOG=warn \
    RECONCILE_INTERVAL_MS=0 ./target/release/prostaff-events & pids+=("$!")
  sleep 3
  if [ "$mode" = replica ]; then
    until redis-cli -p "$REPLICA" info replication | grep -q "master_link_status:up"; do sleep 0.2; done
    sleep 2 # the hub counts the replica at its next liveness check
  fi
  echo "== master $mode ($(redis-cli -p "$MASTER" info replication | grep connected_slaves | tr -d '\r'))"
  ./target/release/hub-bench queue --hub "http://127.0.0.1:$HUB" \
    --redis "redis://127.0.0.1:$MASTER" --clients "$CLIENTS" --actions "$ACTIONS"
  redis-cli -p "$MASTER" info commandstats | tr -d '\r' | grep '^cmdstat_wait' || echo "no WAIT"
  cleanup
done
