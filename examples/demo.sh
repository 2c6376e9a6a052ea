#!/usr/bin/env bash
# Runs Portico end to end on the embedded store: builds the binaries, starts
# the example upstreams (127.0.0.1:9001 and :9002), the control plane on a
# fresh data directory, validates and applies examples/, starts one
# data-plane node (gateway on :8080, admin on 127.0.0.1:9901), sends a
# request through it, and keeps everything running until Ctrl-C. `--once`
# stops after showing the result (used by the tests).
#
# Environment: PORTICO_ADMIN_LISTEN (default 127.0.0.1:7700),
# PORTICO_XDS_LISTEN (default 127.0.0.1:18000),
# PORTICO_DP_ADMIN_LISTEN (default 127.0.0.1:9901),
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
dp_bin="$PORTICO_BIN_DIR/portico-dp"
portico="$PORTICO_BIN_DIR/portico"

data_dir="${PORTICO_DATA_DIR:-$(mktemp -d -t portico-demo.XXXXXX)}"
listen="${PORTICO_ADMIN_LISTEN:-127.0.0.1:7700}"
xds_listen="${PORTICO_XDS_LISTEN:-127.0.0.1:18000}"
dp_admin="${PORTICO_DP_ADMIN_LISTEN:-127.0.0.1:9901}"
rm -f "$data_dir/admin.addr" "$data_dir/dp.admin"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

echo "==> starting the example upstreams on 127.0.0.1:9001 (pets) and :9002 (pets-canary)"
python3 examples/upstream.py 9001 pets & pids+=($!)
python3 examples/upstream.py 9002 pets-canary & pids+=($!)

echo "==> starting portico-cp (data in $data_dir, admin API on $listen, xDS on $xds_listen)"
"$cp_bin" --data-dir "$data_dir" --admin-listen "$listen" --xds-listen "$xds_listen" 2>"$data_dir/portico-cp.log" &
cp_pid=$!
pids+=($cp_pid)

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

echo
echo "==> starting portico-dp (node demo-1 in group edge, admin on $dp_admin)"
"$dp_bin" --xds "$(cat "$data_dir/xds.addr")" --node-id demo-1 --node-group edge \
  --admin-listen "$dp_admin" --admin-address-path "$data_dir/dp.admin" 2>"$data_dir/portico-dp.log" &
pids+=($!)
url="http://127.0.0.1:8080/pets/v2"
for _ in $(seq 1 200); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: api.example.com' "$url" || true)
  [ "$code" = "200" ] && break
  sleep 0.05
done
if [ "$code" != "200" ]; then
  echo "the gateway did not answer 200 (last: $code):" >&2
  cat "$data_dir/portico-dp.log" >&2
  exit 1
fi
run status
echo
echo "\$ curl -s -H 'Host: api.example.com' $url"
curl -s -H 'Host: api.example.com' "$url"

if $once; then
  exit 0
fi
cat <<EOT

Portico is running: the gateway (portico-dp) on :8080, its admin on
$(cat "$data_dir/dp.admin"), the control plane's xDS server at
$(cat "$data_dir/xds.addr") (node.cluster "edge"). Try:
  curl -i -H 'Host: api.example.com' $url
  curl -i http://127.0.0.1:8080/pets/v2/ping
  curl -s http://$(cat "$data_dir/dp.admin")/clusters
In another terminal:
  export PORTICO_SERVER=$PORTICO_SERVER PORTICO_TOKEN_FILE=$PORTICO_TOKEN_FILE
  $portico get apis
  curl -H "Authorization: Bearer \$(cat $PORTICO_TOKEN_FILE)" http://$PORTICO_SERVER/api/v1/openapi.json
Press Ctrl-C to stop.
EOT
wait "$cp_pid"
