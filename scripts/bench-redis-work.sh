#!/usr/bin/env bash
# Redis's work per event as hub instances are added: HUBS hubs (defaults) on one redis-server,
# EVENTS `notification.created` envelopes (each routed to two topics: `org_events:{org}` and
# `notifications:{user}`) published pipelined with redis-cli, and Redis's own accounting
# (`INFO commandstats` calls, `INFO cpu` user+sys) before and after, divided by EVENTS. The
# PUBLISHes themselves are included (one per event), as are the hubs' background commands
# (liveness, lease, presence) over the run, which are printed separately.
#
#   scripts/bench-redis-work.sh HUBS [EVENTS]
#
# Redis runs alone on core 1, the hubs and redis-cli on core 0: Redis's CPU figures are then its
# own work, not time lost sharing a core with up to eight hubs. HUB_BIN picks another build
# (e.g. one from before the sequencer) for a same-run reference.
set -euo pipefail
cd "$(dirname "$0")/.."
HUBS=${1:?hubs}
EVENTS=${2:-5000}
REDIS_PORT=${REDIS_PORT:-6420}
HUB_PORT=${HUB_PORT:-4720}
REDIS_CPU=1
# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh
wait_hub_ready
sleep 2 # every hub has connected, subscribed and (one of them) taken the sequencer lease

cli() { redis-cli -p "$REDIS_PORT" "$@"; }
calls() { cli INFO commandstats | tr -d '\r' | sed -n 's/^cmdstat_[a-z|]*:calls=\([0-9]*\),.*/\1/p' | paste -sd+ | bc; }
cpu() { cli INFO cpu | tr -d '\r' | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.6f", s}'; }
routed() {
  local total=0 i n
  for i in $(seq 0 $((HUBS - 1))); do
    n=$(curl -sf "http://127.0.0.1:$((HUB_PORT + i))/metrics" |
      grep '^prostaff_events_received_total{' | grep 'source="redis"' | grep 'outcome="routed"' |
      awk '{print $2}' | head -1)
    total=$((total + ${n:-0}))
  done
  echo "$total"
}

payloads=$(mktemp); trap 'rm -f "$payloads"; cleanup' EXIT
# RESP, so the JSON needs no quoting.
python3 - "$EVENTS" >"$payloads" <<'PY'
import sys
for n in range(1, int(sys.argv[1]) + 1):
    org, user = f"org{n % 10}", f"user{n % 100}"
    body = ('{"id":"w-%d","type":"notification.created","org_id":"%s","user_id":"%s",'
            '"payload":{"n":%d}}' % (n, org, user, n))
    parts = ["PUBLISH", f"prostaff:events:{org}", body]
    sys.stdout.write(f"*{len(parts)}\r\n" + "".join(f"${len(p.encode())}\r\n{p}\r\n" for p in parts))
PY

idle_calls_before=$(calls); sleep 3; idle_calls=$(( $(calls) - idle_calls_before - 1 ))
calls_before=$(calls); cpu_before=$(cpu); started=$(date +%s.%N)
taskset -c 0 redis-cli -p "$REDIS_PORT" --pipe <"$payloads" >/dev/null
expected=$((EVENTS * HUBS))
for _ in $(seq 600); do
  [ "$(routed)" -ge "$expected" ] && break
  sleep 0.1
done
sleep 1 # notices delivered, any fallback appended
elapsed=$(echo "$(date +%s.%N) - $started" | bc)
calls_after=$(calls); cpu_after=$(cpu)
delivered=$(routed)
commands=$((calls_after - calls_before - 2))
echo "hubs=$HUBS events=$EVENTS routed_on_all_hubs=$delivered/$expected elapsed_s=$(printf %.1f "$elapsed")"
echo "background_commands_per_s=$(echo "scale=1; $idle_calls / 3" | bc)"
echo "commands_per_event=$(echo "scale=2; $commands / $EVENTS" | bc)"
echo "redis_cpu_us_per_event=$(echo "scale=1; ($cpu_after - $cpu_before) * 1000000 / $EVENTS" | bc)"
