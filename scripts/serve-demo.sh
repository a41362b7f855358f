#!/usr/bin/env bash
# Starts one engine and the router on the embedded demo model (CPU), streams a sample completion
# through the client CLI, then keeps both serving in the foreground until Ctrl-C. Fails (exit 1,
# saying why) when a port is taken or a server dies.
set -euo pipefail
BIN="${VENV:-.venv}/bin"
ROUTER_PORT="${ROUTER_PORT:-50051}"
ENGINE_PORT="${ENGINE_PORT:-50052}"
ROUTER_METRICS_PORT="${ROUTER_METRICS_PORT:-9400}"
ENGINE_METRICS_PORT="${ENGINE_METRICS_PORT:-9401}"
LOGS="${LOGS:-.llmserve-logs}"

# Before anything starts or a log is truncated: a second `make serve` while one runs fails here,
# instead of its servers failing to bind while the first one's router answers its checks.
# -P: the repository's folders must not shadow installed packages.
"$BIN/python" -P -c '
import sys
from llmserve.common.ports import check_port_free
try:
    for name, port in zip(sys.argv[1::2], sys.argv[2::2]):
        check_port_free(name, "127.0.0.1", int(port))
except OSError as exc:
    sys.exit(f"error: {exc}\nStop the llmserve already running, or choose other ports with "
             "ROUTER_PORT, ENGINE_PORT, ROUTER_METRICS_PORT and ENGINE_METRICS_PORT.")
' ROUTER_PORT "$ROUTER_PORT" ENGINE_PORT "$ENGINE_PORT" \
  ROUTER_METRICS_PORT "$ROUTER_METRICS_PORT" ENGINE_METRICS_PORT "$ENGINE_METRICS_PORT"

mkdir -p "$LOGS"
echo "== preparing the demo model (created once under ~/.cache/llmserve) =="
"$BIN/llmserve-demo-model"
# Server logs go to files so the streamed completion stays readable; JSON, one event per line.
"$BIN/llmserve-engine" --model demo --port "$ENGINE_PORT" --metrics-port "$ENGINE_METRICS_PORT" \
  --log-format json >"$LOGS/engine.log" 2>&1 &
engine=$!
"$BIN/llmserve-router" --model demo --engines "127.0.0.1:$ENGINE_PORT" --port "$ROUTER_PORT" \
  --metrics-port "$ROUTER_METRICS_PORT" --log-format json >"$LOGS/router.log" 2>&1 &
router=$!
echo "== starting engine and router (logs: $LOGS/engine.log, $LOGS/router.log) =="
trap 'kill "$engine" "$router" 2>/dev/null || true; wait || true' EXIT
trap 'exit 130' INT TERM

failed() {
  echo "error: $1:" >&2
  tail -n 20 "$LOGS/engine.log" "$LOGS/router.log" >&2
  exit 1
}

# Ready when our own router says so in its log: a health call could be answered by another
# router on the same port.
for _ in $(seq 1 240); do
  kill -0 "$engine" 2>/dev/null || failed "the engine exited"
  kill -0 "$router" 2>/dev/null || failed "the router exited"
  if grep -q '"event": "ready"' "$LOGS/router.log"; then break; fi
  sleep 0.5
done
grep -q '"event": "ready"' "$LOGS/router.log" || failed "the router was not ready after 120 s"

echo
echo "== llmserve demo: router 127.0.0.1:$ROUTER_PORT -> engine 127.0.0.1:$ENGINE_PORT =="
echo "== the demo model has random weights: its text is gibberish by design =="
"$BIN/llmserve" generate --target "127.0.0.1:$ROUTER_PORT" --max-tokens 48 --show-usage \
  "Once upon a time"
echo
echo "== serving until Ctrl-C; try: $BIN/llmserve generate \"Hello\" =="
status=0
wait -n "$engine" "$router" || status=$?
failed "a server exited (status $status)"
