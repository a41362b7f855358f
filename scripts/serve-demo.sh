#!/usr/bin/env bash
# Starts one engine and the router on the embedded demo model (CPU), streams a sample completion
# through the client CLI, then keeps both serving in the foreground until Ctrl-C.
set -euo pipefail
BIN="${VENV:-.venv}/bin"
ROUTER_PORT="${ROUTER_PORT:-50051}"
ENGINE_PORT="${ENGINE_PORT:-50052}"
LOGS="${LOGS:-.llmserve-logs}"
mkdir -p "$LOGS"

echo "== preparing the demo model (created once under ~/.cache/llmserve) =="
"$BIN/llmserve-demo-model"
# Server logs go to files so the streamed completion stays readable; JSON, one event per line.
"$BIN/llmserve-engine" --model demo --port "$ENGINE_PORT" --metrics-port 9401 --log-format json \
  >"$LOGS/engine.log" 2>&1 &
engine=$!
"$BIN/llmserve-router" --model demo --engines "127.0.0.1:$ENGINE_PORT" --port "$ROUTER_PORT" \
  --metrics-port 9400 --log-format json >"$LOGS/router.log" 2>&1 &
router=$!
echo "== starting engine and router (logs: $LOGS/engine.log, $LOGS/router.log) =="
trap 'kill "$engine" "$router" 2>/dev/null || true; wait' EXIT INT TERM

for _ in $(seq 1 240); do
  if "$BIN/llmserve" health --target "127.0.0.1:$ROUTER_PORT" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$engine" "$router" 2>/dev/null; then
    echo "a server failed to start:" >&2
    tail -n 20 "$LOGS"/*.log >&2
    exit 1
  fi
  sleep 0.5
done

echo
echo "== llmserve demo: router 127.0.0.1:$ROUTER_PORT -> engine 127.0.0.1:$ENGINE_PORT =="
echo "== the demo model has random weights: its text is gibberish by design =="
"$BIN/llmserve" generate --target "127.0.0.1:$ROUTER_PORT" --max-tokens 48 --show-usage \
  "Once upon a time"
echo
echo "== serving until Ctrl-C; try: $BIN/llmserve generate \"Hello\" =="
wait
