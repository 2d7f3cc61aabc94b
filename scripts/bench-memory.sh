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
# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh
wait_hub_ready

taskset -c 1 ./target/release/hub-bench connections \
  --hub "http://127.0.0.1:$HUB_PORT" --count "$COUNT" --orgs "$ORGS" --hold-secs "$HOLD" \
  --hub-pid "$HUB_PID" --redis "redis://127.0.0.1:$REDIS_PORT" --after-close-secs 60
