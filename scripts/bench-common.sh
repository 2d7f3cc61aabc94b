# Sourced by the bench scripts: builds the bench binaries, starts a redis-server on $REDIS_PORT
# and $HUBS hubs (1 unless set; defaults, plus $PRELOAD / $HUB_ENV / $HUB_BIN) on $HUB_PORT,
# $HUB_PORT+1, …, all pinned to core 0 (or Redis to $REDIS_CPU), and stops them on exit. Sets REDIS_PID, HUB_PID (the
# first hub), HUB_PIDS and `pids`.
ulimit -n 20000
cargo build --release -q --features bench --bins

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 143' TERM INT # so that a killed bench still stops what it started
for i in $(seq 0 $((${HUBS:-1} - 1))); do
  if curl -sf "http://127.0.0.1:$((HUB_PORT + i))/health" >/dev/null; then
    echo "port $((HUB_PORT + i)) already serves a hub: stop it first" >&2
    exit 1
  fi
done

taskset -c "${REDIS_CPU:-0}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --protected-mode no \
  --maxclients 19500 --save "" --appendonly no --loglevel warning &
REDIS_PID=$!; pids+=("$REDIS_PID")
sleep 0.5
HUB_PIDS=()
for i in $(seq 0 $((${HUBS:-1} - 1))); do
  # shellcheck disable=SC2086
  env PORT="$((HUB_PORT + i))" BIND_ADDR=127.0.0.1 REDIS_URL="redis://127.0.0.1:$REDIS_PORT" \
    RUST_LOG=warn RECONCILE_INTERVAL_MS=0 ${PRELOAD:+LD_PRELOAD=$PRELOAD} ${HUB_ENV:-} \
    taskset -c 0 "${HUB_BIN:-./target/release/prostaff-events}" &
  HUB_PIDS+=("$!"); pids+=("$!")
done
HUB_PID=${HUB_PIDS[0]}

# Waits until every hub answers ready (after whatever else the caller started).
wait_hub_ready() {
  for i in $(seq 0 $((${HUBS:-1} - 1))); do
    for _ in $(seq 50); do
      curl -sf "http://127.0.0.1:$((HUB_PORT + i))/health/ready" >/dev/null && break
      sleep 0.2
    done
  done
}
