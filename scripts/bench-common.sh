# Sourced by bench-compare.sh and bench-memory.sh: builds the bench binaries, starts a
# redis-server on $REDIS_PORT and the hub (defaults, plus $PRELOAD / $HUB_ENV / $HUB_BIN) on
# $HUB_PORT, both pinned to core 0, and stops them on exit. Sets REDIS_PID, HUB_PID and `pids`.
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

# Waits until the hub answers ready (after whatever else the caller started).
wait_hub_ready() {
  for _ in $(seq 50); do
    curl -sf "http://127.0.0.1:$HUB_PORT/health/ready" >/dev/null && break
    sleep 0.2
  done
}
