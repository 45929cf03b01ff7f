#!/usr/bin/env bash
# `make test`: run a command (pytest) with PostgreSQL and Redis. When none answers at the configured
# address and none was named explicitly, embedded servers start first (scripts/dev/embedded.py; their data
# in .run/test-services/, apart from `make run`'s) and stop when the command ends, Ctrl-C included.
# With real servers answering (CI, a set-up laptop) this only probes them and runs the command.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
VENV=${VENV:-.venv}
RUN_DIR=${CB_TEST_SERVICES_DIR:-.run/test-services}

# settings_test's Redis database is 15: the embedded Redis gets the same number.
embedded_env=$("$VENV/bin/python" scripts/dev/embedded.py start --run-dir "$RUN_DIR" --redis-db 15) || exit 1
if [[ -z $embedded_env ]]; then
  exec "$@"
fi
# shellcheck disable=SC2317  # called from the EXIT trap
stop_embedded() { "$VENV/bin/python" scripts/dev/embedded.py stop --run-dir "$RUN_DIR" || true; }
trap stop_embedded EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP
eval "$embedded_env"
"$@"
