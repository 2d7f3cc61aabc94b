#!/usr/bin/env bash
# The hub's memory through a storm of sockets and after they close: one `hub-bench connections`
# run against a hub at its defaults, on its own redis-server, with the hub on core 0 and the
# load generator on core 1. Prints the bench's table (RSS before, after connect, per socket,
# and 5 s / 30 s / 60 s after every socket closed).
#
#   scripts/bench-memory.sh COUNT ORGS [HOLD_SECS]
#
# ORGS 1 puts every socket in one org (one presence topic of COUNT members); 100 spreads them.
# PRELOAD=/path/to/libjemalloc.so.2 (or libmimalloc.so.2) runs the hub on that allocator
# instead of its own (the allocator comparison in BENCHMARKS.md); HUB_ENV="NAME=value …" adds
# hub settings; HUB_BIN picks another build.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${1:?count}
ORGS=${2:?orgs}
HOLD=${3:-10}
REDIS_PORT=${REDIS_PORT:-6410}
HUB_PORT=${HUB_PORT:-4710}
ulimit -n 20000
cargo build --release -q --features bench --bins

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

taskset -c 0 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --protected-mode no \
  --maxclients 19500 --save "" --appendonly no --loglevel warning &
REDIS_PID=$!; pids+=("$REDIS_PID")
sleep 0.5
# shellcheck disable=SC2086
env PORT="$HUB_PORT" BIND_ADDR=127.0.0.1 REDIS_URL="redis://127.0.0.1:$REDIS_PORT" RUST_LOG=warn \
  RECONCILE_INTERVAL_MS=0 ${PRELOAD:+LD_PRELOAD=$PRELOAD} ${HUB_ENV:-} \
  taskset -c 0 "${HUB_BIN:-./target/release/prostaff-events}" &
HUB_PID=$!; pids+=("$HUB_PID")
for _ in $(seq 50); do
  curl -sf "http://127.0.0.1:$HUB_PORT/health/ready" >/dev/null && break
  sleep 0.2
done

taskset -c 1 ./target/release/hub-bench connections \
  --hub "http://127.0.0.1:$HUB_PORT" --count "$COUNT" --orgs "$ORGS" --hold-secs "$HOLD" \
  --hub-pid "$HUB_PID" --redis "redis://127.0.0.1:$REDIS_PORT" --after-close-secs 60
