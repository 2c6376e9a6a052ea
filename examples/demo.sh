#!/usr/bin/env bash
# Runs Portico end to end on the embedded store: builds the binaries, starts
# the control plane on a fresh data directory, validates and applies
# examples/, shows the result, and keeps the control plane running until
# Ctrl-C. `--once` stops after showing the result (used by the tests).
#
# Environment: PORTICO_ADMIN_LISTEN (default 127.0.0.1:7700),
# PORTICO_XDS_LISTEN (default 127.0.0.1:18000),
# PORTICO_DATA_DIR (default: a new temporary directory),
# PORTICO_BIN_DIR (use binaries from there instead of building).
set -euo pipefail
cd "$(dirname "$0")/.."

once=false
[ "${1:-}" = "--once" ] && once=true

if [ -z "${PORTICO_BIN_DIR:-}" ]; then
  echo "==> building (cargo build --workspace --bins)"
  cargo build --workspace --bins --quiet
  PORTICO_BIN_DIR=target/debug
fi
cp_bin="$PORTICO_BIN_DIR/portico-cp"
portico="$PORTICO_BIN_DIR/portico"

data_dir="${PORTICO_DATA_DIR:-$(mktemp -d -t portico-demo.XXXXXX)}"
listen="${PORTICO_ADMIN_LISTEN:-127.0.0.1:7700}"
rm -f "$data_dir/admin.addr"

echo "==> starting portico-cp (data in $data_dir, admin API on $listen)"
"$cp_bin" --data-dir "$data_dir" --admin-listen "$listen" 2>"$data_dir/portico-cp.log" &
cp_pid=$!
trap 'kill $cp_pid 2>/dev/null || true' EXIT

# Wait for the control plane to say where it listens (or to die).
for _ in $(seq 1 600); do
  [ -s "$data_dir/admin.addr" ] && break
  if ! kill -0 "$cp_pid" 2>/dev/null; then
    echo "portico-cp failed to start:" >&2
    cat "$data_dir/portico-cp.log" >&2
    exit 1
  fi
  sleep 0.05
done
[ -s "$data_dir/admin.addr" ] || { echo "portico-cp did not start listening" >&2; exit 1; }

export PORTICO_SERVER="$(cat "$data_dir/admin.addr")"
export PORTICO_TOKEN_FILE="$data_dir/admin.token"

run() { echo; echo "\$ portico $*"; "$portico" "$@"; }
run validate -f examples/
run apply -f examples/ -m "demo: the petstore"
run get all
run history
run status

if $once; then
  exit 0
fi
cat <<EOT

Portico's control plane is running; data-plane nodes, Envoys and proxyless
gRPC clients connect to its xDS server at $(cat "$data_dir/xds.addr") (node.cluster "edge").
In another terminal:
  export PORTICO_SERVER=$PORTICO_SERVER PORTICO_TOKEN_FILE=$PORTICO_TOKEN_FILE
  $portico get apis
  curl -H "Authorization: Bearer \$(cat $PORTICO_TOKEN_FILE)" http://$PORTICO_SERVER/api/v1/openapi.json
Press Ctrl-C to stop.
EOT
wait "$cp_pid"
