#!/usr/bin/env bash
# `make run`: bring the whole system up on this machine against PostgreSQL and Redis on 127.0.0.1
# (or wherever DATABASE_URL / POSTGRES_* and REDIS_URL point).
#
#   1. local secrets: SECRET_KEY and FLOWER_BASIC_AUTH from the environment, else generated once and kept
#      in .run/ (CB_RUN_DIR; mode 0600, ignored by git), so restarts keep sessions and the Flower password;
#   2. embedded PostgreSQL/Redis (scripts/dev/embedded.py) only when none answers at the configured
#      address and none was named explicitly (DATABASE_URL, REDIS_URL); then
#      preflight (scripts/dev/preflight.py): PostgreSQL and Redis reachable, database created, migrated,
#      admin user and API token; then it writes the settings this run uses (database, Redis, SECRET_KEY,
#      paths: every variable settings.py read that is set) to .run/local.env, which manage.py reads in
#      another terminal (project/env.py: the environment first, then that file, then the defaults);
#   3. honcho runs the Procfile (web :9595, scheduler, worker, Flower :5555); Ctrl-C stops them all and
#      exits 0 (the Makefile's `set -m` keeps the Ctrl-C from `make` itself).
#
# This script reads the process environment only: not .env (docker compose's: its container host names,
# db and redis, would be wrong here), and not the .run/local.env of an earlier run (CB_LOCAL_ENV_FILE=""),
# so what it chooses never depends on a previous start.
# The whole script is one { ... } block: bash parses it before running any of it, so editing this file
# (or a `git pull`) while `make run` is up cannot make the running copy read a shifted, broken line.
{
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[run] no virtualenv at $VENV: run \`make run\` (it installs first) or \`make install\`" >&2
  exit 1
fi
VENV=$(cd "$VENV" && pwd)  # absolute, whether VENV was given relative or absolute
export PATH="$VENV/bin:$PATH"
export PYTHONUNBUFFERED=1

RUN_DIR=${CB_RUN_DIR:-$PWD/.run}
export CB_RUN_DIR=$RUN_DIR
export CB_LOCAL_ENV_FILE=""
mkdir -p "$RUN_DIR"
chmod 700 "$RUN_DIR"

# Prints the file's content, creating it first from the generator command if it is missing or empty.
keep_secret() {
  local file=$1
  shift
  if [[ ! -s "$file" ]]; then
    (umask 077 && "$@" >"$file")
  fi
  tr -d '\n' <"$file"
}

if [[ -z "${SECRET_KEY:-}" ]]; then
  SECRET_KEY=$(keep_secret "$RUN_DIR/secret_key" python -c 'import secrets; print(secrets.token_urlsafe(50))')
  export SECRET_KEY
fi
if [[ -z "${FLOWER_BASIC_AUTH:-}" ]]; then
  FLOWER_BASIC_AUTH=$(keep_secret "$RUN_DIR/flower_basic_auth" \
    python -c 'import secrets; print("admin:" + secrets.token_urlsafe(12))')
  export FLOWER_BASIC_AUTH
fi
export WEB_PORT=${WEB_PORT:-9595}
export FLOWER_PORT=${FLOWER_PORT:-5555}
export WEB_BIND=${WEB_BIND:-127.0.0.1:$WEB_PORT}
export FLOWER_ADDRESS=${FLOWER_ADDRESS:-127.0.0.1}
if [[ -z "${CYBER_BRAIN_LOGS:-}" && ! -e logs ]]; then
  # First run: seed ./logs (the default CYBER_BRAIN_LOGS) with the sample logs, so the first log_triage
  # run finds something. Later runs leave ./logs alone.
  cp -R samples/logs logs
  echo "[run] seeded ./logs with samples/logs (an SSH brute force, a path scan, tracebacks, an OOM kill)"
fi
export CYBER_BRAIN_LOGS=${CYBER_BRAIN_LOGS:-$PWD/logs}
export UPLOADS_DIR=${UPLOADS_DIR:-$PWD/uploads}
mkdir -p "$CYBER_BRAIN_LOGS" "$UPLOADS_DIR"

# Nothing answers at the configured PostgreSQL or Redis address (and none was named explicitly): embedded
# servers from requirements/local.txt, their data in .run/ (scripts/dev/embedded.py states the exact rule).
# A real server that answers is always used and this prints nothing. The embedded ones stop on the way
# out, after the processes that use them; a Ctrl-C before honcho starts stops them too.
embedded_env=$(python scripts/dev/embedded.py start --run-dir "$RUN_DIR")
if [[ -n $embedded_env ]]; then
  # shellcheck disable=SC2317  # called from the EXIT trap
  stop_embedded() { python scripts/dev/embedded.py stop --run-dir "$RUN_DIR" || true; }
  trap stop_embedded EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM HUP
  eval "$embedded_env"
fi

python scripts/dev/preflight.py

echo "[run] Flower basic auth: $FLOWER_BASIC_AUTH   (FLOWER_BASIC_AUTH; kept in $(realpath --relative-to=. "$RUN_DIR")/flower_basic_auth)"
echo "[run] starting: API http://$WEB_BIND/api/  docs http://$WEB_BIND/api/docs/  admin http://$WEB_BIND/admin/"
echo "[run]           Flower http://$FLOWER_ADDRESS:$FLOWER_PORT/   (Ctrl-C stops everything)"

# Every process of this run carries CB_RUN_ID, so whatever honcho leaves behind can be found and stopped
# (honcho starts each in its own session; if honcho itself dies, e.g. `make run | tee` and Ctrl-C kills
# tee first, they would otherwise outlive it).
CB_RUN_ID="run-$$-$(date +%s%N)"
export CB_RUN_ID

stop_leftovers() {
  [[ -d /proc/self ]] || return 0  # Linux only; elsewhere honcho's own stop is all there is.
  local dir pid pids=() round
  for round in $(seq 1 20); do
    pids=()
    for dir in /proc/[0-9]*; do
      pid=${dir#/proc/}
      [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
      if grep -qzx "CB_RUN_ID=$CB_RUN_ID" "$dir/environ" 2>/dev/null; then
        pids+=("$pid")
      fi
    done
    (( ${#pids[@]} )) || return 0
    if (( round == 1 )); then
      echo "[run] stopping ${#pids[@]} process(es) left behind: ${pids[*]}" >&2
      kill -TERM "${pids[@]}" 2>/dev/null
    elif (( round == 20 )); then
      kill -KILL "${pids[@]}" 2>/dev/null
    fi
    sleep 0.5
  done
}

# --env names a file that never exists so honcho does not read .env (see above).
set +e
honcho --procfile Procfile --app-root "$PWD" --env "$RUN_DIR/no-such-env-file" start &
honcho_pid=$!
# From here on a write to a closed pipe (`make run | tee`, tee killed by Ctrl-C) must not kill this
# script before it has stopped everything.
trap '' PIPE
# In a terminal honcho gets Ctrl-C's SIGINT itself; a TERM or INT sent to this script (CI, `kill`) is
# passed on. honcho then stops every process: SIGTERM, and SIGKILL 5 s later.
stop_requested=0
# shellcheck disable=SC2317  # called from the traps below
request_stop() {
  stop_requested=1
  kill "-$1" "$honcho_pid" 2>/dev/null
}
trap 'request_stop TERM' TERM HUP
trap 'request_stop INT' INT
while kill -0 "$honcho_pid" 2>/dev/null; do
  if (( stop_requested )); then
    # honcho may be stuck (its output pipe gone): give it twice its own kill delay, then act alone.
    for _ in $(seq 1 20); do
      kill -0 "$honcho_pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$honcho_pid" 2>/dev/null; then
      echo "[run] honcho did not stop in 10 s: stopping its processes directly" >&2
      kill -KILL "$honcho_pid" 2>/dev/null
    fi
    break
  fi
  wait "$honcho_pid"
done
wait "$honcho_pid" 2>/dev/null
status=$?
stop_leftovers
# honcho answers a stop with 130 (SIGINT) or 143 (SIGTERM); asked for, that stop is a success. A process
# that died on its own first makes honcho stop the rest and return that process's status instead.
if (( stop_requested )) && (( status == 130 || status == 143 )); then
  echo "[run] stopped"
  status=0
fi
exit "$status"
}
