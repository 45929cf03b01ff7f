#!/usr/bin/env bash
# CI step: start the stack the way `make run` does, in the background; wait for the API health check
# and Flower; run scripts/smoke_phase2.py; stop the stack and make sure no process of it is left.
# Exits with the smoke test's status (or non-zero when the stack never came up).
#
# Needs PostgreSQL and Redis up (as .ci/run ensures). WEB_PORT/FLOWER_PORT move the ports;
# POSTGRES_DB/REDIS_URL and the rest of docs/OPERATIONS.md, "Settings" are honoured as in `make run`.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

export WEB_PORT=${WEB_PORT:-9595}
export FLOWER_PORT=${FLOWER_PORT:-5555}
STARTUP_TIMEOUT=${CB_STARTUP_TIMEOUT:-120}
LOG=.run/ci_smoke.log

log() { printf '[ci-smoke] %s\n' "$*"; }

make --no-print-directory install >/dev/null || { log "make install failed"; exit 1; }
mkdir -p .run

# setsid: the stack gets its own session, so stopping it never signals this script or CI itself.
setsid scripts/run_local.sh >"$LOG" 2>&1 </dev/null &
stack_pid=$!

stop_stack() {
  if kill -0 "$stack_pid" 2>/dev/null; then
    log "stopping the stack (pid $stack_pid)"
    kill -TERM "$stack_pid" 2>/dev/null
    # honcho stops its processes and SIGKILLs stragglers after 5 s; allow it that and more.
    for _ in $(seq 1 60); do
      kill -0 "$stack_pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL "$stack_pid" 2>/dev/null
  fi
  wait "$stack_pid" 2>/dev/null
  # Safety net: each honcho process leads its own process group. Give any still shutting down a few
  # seconds, then kill it and report it (honcho should have waited for them all).
  local pgids pgid leftovers=0
  pgids=$(sed -n 's/.* started (pid=\([0-9]*\)).*/\1/p' "$LOG" 2>/dev/null)
  for _ in $(seq 1 20); do
    alive=0
    for pgid in $pgids; do kill -0 -- "-$pgid" 2>/dev/null && alive=1; done
    (( alive )) || break
    sleep 0.5
  done
  for pgid in $pgids; do
    if kill -0 -- "-$pgid" 2>/dev/null; then
      leftovers=1
      log "process group $pgid still alive after the stack stopped: killing it"
      ps -eo pid,pgid,args | awk -v g="$pgid" '$2 == g'
      kill -KILL -- "-$pgid" 2>/dev/null
    fi
  done
  return "$leftovers"
}
trap 'stop_stack; exit 130' INT TERM

http_status() {
  curl --silent --output /dev/null --max-time 5 --write-out '%{http_code}' "$1" 2>/dev/null || true
}

log "waiting up to ${STARTUP_TIMEOUT}s for http://127.0.0.1:$WEB_PORT/api/health/ and Flower :$FLOWER_PORT"
started=$SECONDS
up=0
while (( SECONDS - started < STARTUP_TIMEOUT )); do
  if ! kill -0 "$stack_pid" 2>/dev/null; then
    break
  fi
  if [[ $(http_status "http://127.0.0.1:$WEB_PORT/api/health/") == 200 ]] \
    && [[ $(http_status "http://127.0.0.1:$FLOWER_PORT/") =~ ^(200|401)$ ]]; then
    up=1
    break
  fi
  sleep 1
done

status=1
if (( up )); then
  log "stack up after $(( SECONDS - started ))s; running the smoke test"
  CB_BASE_URL="http://127.0.0.1:$WEB_PORT" CB_FLOWER_URL="http://127.0.0.1:$FLOWER_PORT" \
    timeout 300 python3 scripts/smoke_phase2.py
  status=$?
elif ! kill -0 "$stack_pid" 2>/dev/null; then
  log "the stack exited before it came up"
else
  log "the stack did not come up within ${STARTUP_TIMEOUT}s"
fi

stop_stack || status=1
if (( status != 0 )); then
  log "stack log (last 80 lines of $LOG):"
  tail -n 80 "$LOG"
fi
log "done, status $status"
exit "$status"
