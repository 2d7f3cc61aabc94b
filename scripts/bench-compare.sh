#!/usr/bin/env bash
# One `hub-bench compare` run with the processes pinned: redis-server, the hub and the floor
# server on core 0, the load generator on core 1 (the machine has two). Prints the bench's
# tables; BENCHMARKS.md quotes them.
#
#   scripts/bench-compare.sh SUBSCRIBERS MESSAGES [RATE] [ORGS]
#
# RATE 0 (the default) publishes flat out (throughput); a rate measures latency. Extra hub
# settings can be passed in the environment as HUB_ENV="NAME=value …"; HUB_BIN picks another
# build of the hub (e.g. target/release-unchecked/prostaff-events); PRELOAD=/path/to/lib.so runs
# the hub on another malloc (the allocator comparison in BENCHMARKS.md). PAYLOAD_BYTES sets the
# events' padding (the workload, not a hub setting; 100 by default).
set -euo pipefail
cd "$(dirname "$0")/.."
SUBSCRIBERS=${1:?subscribers}
MESSAGES=${2:?messages}
RATE=${3:-0}
ORGS=${4:-1}
REDIS_PORT=${REDIS_PORT:-6400}
HUB_PORT=${HUB_PORT:-4700}
FLOOR_PORT=${FLOOR_PORT:-4800}
# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh
taskset -c 0 ./target/release/hub-bench floor-server --port "$FLOOR_PORT" \
  --redis "redis://127.0.0.1:$REDIS_PORT" &
FLOOR_PID=$!; pids+=("$FLOOR_PID")
wait_hub_ready

taskset -c 1 ./target/release/hub-bench compare \
  --hub "http://127.0.0.1:$HUB_PORT" --floor "http://127.0.0.1:$FLOOR_PORT" \
  --redis "redis://127.0.0.1:$REDIS_PORT" \
  --subscribers "$SUBSCRIBERS" --messages "$MESSAGES" --rate "$RATE" --orgs "$ORGS" \
  --hub-pid "$HUB_PID" --floor-pid "$FLOOR_PID" --redis-pid "$REDIS_PID" \
  ${PAYLOAD_BYTES:+--payload-bytes "$PAYLOAD_BYTES"}
