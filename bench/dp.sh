#!/usr/bin/env bash
# Data-plane benchmark: portico-dp against nginx and HAProxy as reverse
# proxies, and against no proxy at all, on loopback.
#
# Usage: bash bench/dp.sh [--no-build] [--instructions] [--help]
#
# Two builds of portico-dp take part: `portico`, the plain release build
# (`cargo build --release`), and `portico-pgo`, the same code built with
# profile-guided optimisation by bench/pgo.sh (trained on this benchmark's
# traffic; see that script).
#
# Every proxy forwards to the same origin, a separate nginx (1 worker)
# answering `200 hello world` over HTTP/1.1 keep-alive. Load is HTTP/1.1 from
# wrk (-t1 -c50) and HTTP/2 cleartext with prior knowledge (h2c) from h2load
# (-c10 -m10), each run preceded by a warm-up. Two layouts:
#   pinned:   proxy on CPU 1 with 1 worker; load generator and origin on CPU 0
#   unpinned: nothing pinned; proxies with 2 workers (threads)
# and, when named in LAYOUTS, a third:
#   affinity: as unpinned, but each proxy pins its own workers, one per CPU,
#             with its own option (nginx `worker_cpu_affinity auto`, HAProxy
#             `cpu-map auto:1/1-N 0-(N-1)`, `portico-dp --cpu-affinity`)
# Per run: req/s, p50 and p99 latency, the proxy's RSS after the run (VmRSS
# summed over its processes) and its CPU time per request (first field of
# /proc/PID/task/*/schedstat over all its threads, after minus before the
# measured run, divided by the completed requests) with its kernel part (the
# system share of the process's user and system clock ticks; it holds the
# system calls and the TCP work a proxy's sends do for their receivers, which
# a proxy making the same calls cannot avoid). Each run also notes how
# much CPU anything else on the machine used meanwhile, and warns when that is
# above 10% of a core: on a shared machine such runs are not comparable.
# The tables go to stdout and to bench/dp/last-run.md; the raw tool output,
# configs and logs stay in a temporary directory whose path is printed.
#
# Missing tools (nginx, haproxy, wrk, h2load, curl, python3) are installed
# from Debian packages (with sudo unless root). portico-dp, portico-cp and
# portico are built with `cargo build --release` if target/release lacks them,
# and the PGO build with bench/pgo.sh if target/pgo lacks it, unless
# --no-build is given. Neither is rebuilt when present: after a change,
# rebuild first (the PGO build's commit is in target/pgo/built-from, and a
# warning says when it is not the checked-out one).
#
# Two more rows on request (PROXIES), for HTTP/1.1 only: `relay` and
# `relay-uring`, bench/src/bin/relay.rs — a relay that forwards each
# request's and answer's bytes as they came over an upstream connection of
# each client connection's own, with epoll (through tokio, as portico-dp)
# or with io_uring. They do nothing a proxy must do beyond the system calls,
# so their CPU per request is the floor under any proxy on this machine.
# (They have no affinity option: in the affinity layout they run unpinned.)
#
# --instructions: instead, count each proxy's user-space instructions per
# request under valgrind's callgrind (one worker, INSTR_REQUESTS requests
# with h2load after a warm-up, counters zeroed in between). Unlike time on
# CPU this does not move with the machine's speed, so it shows what a
# change to a proxy's own code did even on a noisy machine; it does not
# see the kernel's share (the syscalls, about the same for every proxy).
#
# Environment:
#   INSTR_REQUESTS=20000 requests counted per proxy and protocol (--instructions)
#   DURATION=10        seconds of each measured run
#   WARMUP=2           seconds of the warm-up before each measured run
#   PROXIES="direct nginx haproxy portico portico-pgo"   which rows to run
#                      (add relay and relay-uring for the floor rows)
#   LAYOUTS="pinned unpinned"   (add "affinity" for the third layout)
#   PROTOCOLS="h1 h2"
#   UNPINNED_WORKERS=2 workers/threads of each proxy in the unpinned layout
#   REPEAT=1           runs of each cell, round-robin over the proxies; the
#                      table shows the run with the median req/s
#   PORTICO_BIN_DIR=target/release   where portico-dp, portico-cp, portico are
#   BENCH_CONFIG=bench/dp/portico.yaml   the Portico configuration applied
#                      (one route); bench/dp/portico-rich.yaml is a dozen
#                      routes with matchers, header edits and retries, which
#                      bench/pgo.sh does not train on (a relative path is
#                      taken from the directory the script is run in)
#   PGO_BIN_DIR=target/pgo   where the PGO build of portico-dp is
#   REPORT_FILE=bench/dp/last-run.md   where the tables are written
#   PORTICO_LOG=warn   log filter for portico-cp and portico-dp
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
# The caller's path, before the script moves to the repository's root.
if [ -n "${BENCH_CONFIG:-}" ]; then
  [ -f "$BENCH_CONFIG" ] || { echo "bench/dp.sh: BENCH_CONFIG: no such file: $BENCH_CONFIG" >&2; exit 2; }
  BENCH_CONFIG="$(cd "$(dirname "$BENCH_CONFIG")" && pwd)/$(basename "$BENCH_CONFIG")"
fi
cd "$(dirname "$SELF")/.."
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export LC_ALL=C

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$SELF"; }

build=true
instructions=false
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) build=false ;;
    --instructions) instructions=true ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench/dp.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
PROXIES="${PROXIES:-direct nginx haproxy portico portico-pgo}"
LAYOUTS="${LAYOUTS:-pinned unpinned}"
PROTOCOLS="${PROTOCOLS:-h1 h2}"
UNPINNED_WORKERS="${UNPINNED_WORKERS:-2}"
REPEAT="${REPEAT:-1}"
BIN="${PORTICO_BIN_DIR:-target/release}"
PGO_BIN="${PGO_BIN_DIR:-target/pgo}"
REPORT_FILE="${REPORT_FILE:-bench/dp/last-run.md}"
BENCH_CONFIG="${BENCH_CONFIG:-bench/dp/portico.yaml}"
[ -f "$BENCH_CONFIG" ] || { echo "bench/dp.sh: BENCH_CONFIG: no such file: $BENCH_CONFIG" >&2; exit 2; }
WRK_CONNS=50
H2_CONNS=10
H2_STREAMS=10
READY_SECS=10
BUSY_WARN=10 # % of a core used by other work that makes a run suspect
# Set per layout: each proxy's own option pinning its workers (affinity).
NGINX_AFFINITY="" HAPROXY_AFFINITY="" PORTICO_AFFINITY=()

die() { echo "bench/dp.sh: error: $*" >&2; exit 1; }
say() { echo "==> $*" >&2; }

for v in DURATION WARMUP UNPINNED_WORKERS REPEAT; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
for p in $PROXIES; do
  case "$p" in direct|nginx|haproxy|portico|portico-pgo|relay|relay-uring) ;; *) die "unknown proxy in PROXIES: $p" ;; esac
done
for l in $LAYOUTS; do
  case "$l" in pinned|unpinned|affinity) ;; *) die "unknown layout in LAYOUTS: $l" ;; esac
done
for p in $PROTOCOLS; do
  case "$p" in h1|h2) ;; *) die "unknown protocol in PROTOCOLS: $p" ;; esac
done
want() { [[ " $PROXIES " == *" $1 "* ]]; }
# The builds of portico-dp in PROXIES, and the binary of one.
PORTICOS=()
for p in $PROXIES; do [[ "$p" == portico* ]] && PORTICOS+=("$p"); done
dp_binary() { if [ "$1" = portico-pgo ]; then echo "$PGO_BIN/portico-dp"; else echo "$BIN/portico-dp"; fi; }
# The floor rows in PROXIES (HTTP/1.1 only).
RELAYS=()
for p in $PROXIES; do [[ "$p" == relay* ]] && RELAYS+=("$p"); done
# Whether PROXY takes part in PROTO.
serves() { [[ "$1" != relay* || "$2" == h1 ]]; }

# ---------------------------------------------------------------- tools ----
install_tools() {
  local missing=() pkgs=() sudo=()
  command -v nginx >/dev/null || missing+=(nginx)
  command -v haproxy >/dev/null || missing+=(haproxy)
  command -v wrk >/dev/null || missing+=(wrk)
  command -v h2load >/dev/null || missing+=(h2load)
  command -v curl >/dev/null || missing+=(curl)
  command -v python3 >/dev/null || missing+=(python3)
  command -v taskset >/dev/null || missing+=(taskset)
  if $instructions; then
    command -v valgrind >/dev/null || missing+=(valgrind)
    command -v callgrind_control >/dev/null || missing+=(valgrind)
  fi
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing missing tools: ${missing[*]}"
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "missing ${missing[*]}; not root and no sudo to install them"
    sudo=(sudo)
  fi
  "${sudo[@]}" apt-get update -q >&2 || die "apt-get update failed"
  local m
  for m in "${missing[@]}"; do
    case "$m" in
      # Debian 12's nginx-light is now nginx plus a module, and later
      # releases only have nginx: the plain package fits everywhere.
      nginx) pkgs+=(nginx) ;;
      h2load) pkgs+=(nghttp2-client) ;;
      taskset) pkgs+=(util-linux) ;;
      *) pkgs+=("$m") ;;
    esac
  done
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >&2 \
    || die "apt-get install ${pkgs[*]} failed"
  for m in "${missing[@]}"; do
    command -v "$m" >/dev/null || die "$m still not found after installing ${pkgs[*]}"
  done
}
install_tools

NGINX_VERSION="$(nginx -v 2>&1 | sed -n 's#.*nginx/\([0-9][0-9.]*\).*#\1#p')"
[ -n "$NGINX_VERSION" ] || die "cannot read the nginx version from 'nginx -v'"
HAPROXY_VERSION="$(haproxy -v 2>&1 | sed -n '1s/.*version \([0-9][0-9.]*\).*/\1/p')"
version_ge() { [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n1)" = "$2" ]; }

# --------------------------------------------------------------- build -----
if [ ${#PORTICOS[@]} -gt 0 ]; then
  if [ ! -x "$BIN/portico-cp" ] || [ ! -x "$BIN/portico" ]; then
    $build || die "$BIN/portico-cp or $BIN/portico is missing and --no-build was given"
    say "building portico-cp and portico (cargo build --release --workspace --bins)"
    cargo build --release --locked --workspace --bins || die "cannot build portico-cp / portico"
  fi
  if want portico && [ ! -x "$BIN/portico-dp" ]; then
    $build || die "$BIN/portico-dp is missing and --no-build was given (or run with PROXIES='direct nginx haproxy')"
    say "building portico-dp (cargo build --release --workspace --bins)"
    cargo build --release --locked --workspace --bins \
      || die "portico-dp does not build; fix it, or run without it: PROXIES='direct nginx haproxy' bash bench/dp.sh"
  fi
  if want portico-pgo && [ ! -x "$PGO_BIN/portico-dp" ]; then
    $build || die "$PGO_BIN/portico-dp is missing and --no-build was given (build it with bash bench/pgo.sh, or leave portico-pgo out of PROXIES)"
    [ "$PGO_BIN" = target/pgo ] || die "$PGO_BIN/portico-dp is missing (bench/pgo.sh builds target/pgo only)"
    say "building portico-dp with profile-guided optimisation (bash bench/pgo.sh)"
    bash bench/pgo.sh || die "the PGO build failed; or run without it: PROXIES='direct nginx haproxy portico' bash bench/dp.sh"
  fi
  for b in portico-cp portico; do
    [ -x "$BIN/$b" ] || die "$BIN/$b is still missing after the build"
  done
  for p in "${PORTICOS[@]}"; do
    [ -x "$(dp_binary "$p")" ] || die "$(dp_binary "$p") is still missing after the build"
  done
  if want portico-pgo && [ -r "$PGO_BIN/built-from" ]; then
    here="$(bash bench/pgo.sh --code-state)"
    [ "$(cat "$PGO_BIN/built-from")" = "$here" ] \
      || say "warning: $PGO_BIN/portico-dp was built from $(cat "$PGO_BIN/built-from"), not $here; rebuild it with bash bench/pgo.sh"
  fi
fi

if [ ${#RELAYS[@]} -gt 0 ] && [ ! -x "$BIN/relay" ]; then
  $build || die "$BIN/relay is missing and --no-build was given"
  say "building the relay (cargo build --release -p portico-bench --bin relay)"
  cargo build --release --locked -p portico-bench --bin relay || die "the relay does not build"
  [ -x "$BIN/relay" ] || die "$BIN/relay is still missing after the build (cargo builds into target/release)"
fi

if [[ " $LAYOUTS " == *" pinned "* ]] && [ "$(nproc --all 2>/dev/null || nproc)" -lt 2 ]; then
  die "the pinned layout needs CPUs 0 and 1; run with LAYOUTS=unpinned"
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ------------------------------------------------------------ processes ----
TMP="$(mktemp -d -t portico-dp-bench.XXXXXX)"
chmod 755 "$TMP" # nginx workers run as nobody when started by root
RAW="$TMP/raw"
mkdir -p "$RAW"
STARTED=()   # root pids of everything started in the background

# Prints the state letter of a pid ('' if gone).
pid_state() {
  local line
  { read -r line <"/proc/$1/stat"; } 2>/dev/null || return 0
  line="${line##*) }"
  echo "${line%% *}"
}
alive() { local s; s="$(pid_state "$1")"; [ -n "$s" ] && [ "$s" != Z ] && [ "$s" != X ]; }

# Prints a pid and all its descendants.
proc_tree() {
  local -A kids=()
  local f line rest pid ppid _s queue tree
  for f in /proc/[0-9]*/stat; do
    { read -r line <"$f"; } 2>/dev/null || continue
    rest="${line##*) }"
    read -r _s ppid _ <<<"$rest"
    pid="${f#/proc/}"; pid="${pid%/stat}"
    kids[$ppid]+=" $pid"
  done
  queue=("$1"); tree=()
  while [ ${#queue[@]} -gt 0 ]; do
    pid="${queue[0]}"; queue=("${queue[@]:1}")
    tree+=("$pid")
    # shellcheck disable=SC2206
    [ -n "${kids[$pid]:-}" ] && queue+=(${kids[$pid]})
  done
  echo "${tree[*]}"
}

# start_bg LOG CMD... : runs CMD in the background; its pid is in LAST_PID.
start_bg() {
  local logf="$1"; shift
  "$@" >"$logf" 2>&1 </dev/null &
  LAST_PID=$!
  STARTED+=("$LAST_PID")
}

# stop_tree PID: TERM, up to 5 s grace, then KILL the pid and its descendants.
stop_tree() {
  local root="$1" pids p i any
  pids="$(proc_tree "$root")"
  kill -TERM "$root" 2>/dev/null || true
  for i in $(seq 1 50); do
    any=false
    for p in $pids; do alive "$p" && any=true; done
    $any || break
    sleep 0.1
  done
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
  wait "$root" 2>/dev/null || true
  local keep=()
  for p in "${STARTED[@]}"; do [ "$p" = "$root" ] || keep+=("$p"); done
  STARTED=("${keep[@]}")
}

cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do stop_tree "${STARTED[$i]}" || true; done
  [ -d "${TMP:-}" ] && echo "raw output: $TMP" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Waits until URL answers 200 through curl (extra curl args after NAME).
wait_ready() {
  local pid="$1" url="$2" name="$3" logf="$4" code deadline
  shift 4
  deadline=$((SECONDS + READY_SECS))
  while :; do
    if ! alive "$pid"; then
      echo "---- $logf" >&2; cat "$logf" >&2 || true
      die "$name exited during start-up"
    fi
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$@" "$url" 2>/dev/null || true)"
    [ "$code" = 200 ] && return 0
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "---- $logf" >&2; cat "$logf" >&2 || true
      die "$name did not answer 200 on $url within ${READY_SECS} s (last status: $code)"
    fi
    sleep 0.1
  done
}

# Free ports below the ephemeral range (so no client socket takes them
# between runs), each checked by binding it on 127.0.0.1.
read -r -a PORTS <<<"$(python3 - 8 <<'EOF'
import random, socket, sys
n = int(sys.argv[1])
try:
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except Exception:
    low = 32768
held, ports = [], []
cands = list(range(10000, max(low, 10001)))
random.shuffle(cands)
for p in cands + [0] * n:
    if len(ports) == n:
        break
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        s.close()
        continue
    held.append(s)
    ports.append(s.getsockname()[1])
print(" ".join(map(str, ports)))
EOF
)"
[ ${#PORTS[@]} -eq 8 ] || die "cannot find free ports"
UP_H1=${PORTS[0]} UP_H2=${PORTS[1]}
NGINX_H1=${PORTS[2]} NGINX_H2=${PORTS[3]}
HAPROXY_H1=${PORTS[4]} HAPROXY_H2=${PORTS[5]}
PORTICO_PORT=${PORTS[6]}
RELAY_PORT=${PORTS[7]}

# h2c listener syntax: `http2 on;` since nginx 1.25.1, `listen ... http2` before.
nginx_h2_listen() {
  if version_ge "$NGINX_VERSION" 1.25.1; then
    echo "listen 127.0.0.1:$1; http2 on;"
  else
    echo "listen 127.0.0.1:$1 http2;"
  fi
}
nginx_common() { # DIR WORKERS
  cat <<EOF
daemon off;
master_process ${NGINX_MASTER:-on};
worker_processes $2;
${NGINX_AFFINITY:-}
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
EOF
}
nginx_http_common() { # DIR
  cat <<EOF
  access_log off;
  client_body_temp_path $1/client_body;
  proxy_temp_path $1/proxy;
  fastcgi_temp_path $1/fastcgi;
  uwsgi_temp_path $1/uwsgi;
  scgi_temp_path $1/scgi;
  keepalive_timeout 300s;
  keepalive_requests 1000000;
EOF
}
nginx_args() { # DIR -> NGINX_ARGS
  NGINX_ARGS=(-p "$1/" -c "$1/nginx.conf")
  if version_ge "$NGINX_VERSION" 1.19.5; then NGINX_ARGS+=(-e "$1/error.log"); fi
}

# -- origin: separate nginx, 1 worker, HTTP/1.1 keep-alive (+ an h2c port
# for the direct HTTP/2 row).
start_origin() { # PIN...
  local d="$TMP/runs/$layout-origin"
  mkdir -p "$d"
  {
    nginx_common "$d" 1
    echo "http {"
    nginx_http_common "$d"
    cat <<EOF
  server {
    listen 127.0.0.1:$UP_H1;
    $(nginx_h2_listen "$UP_H2")
    location / {
      default_type text/plain;
      return 200 "hello world\n";
    }
  }
}
EOF
  } >"$d/nginx.conf"
  nginx_args "$d"
  start_bg "$d/stderr.log" "$@" nginx "${NGINX_ARGS[@]}"
  ORIGIN_PID=$LAST_PID
  wait_ready "$ORIGIN_PID" "http://127.0.0.1:$UP_H1/" "origin nginx" "$d/error.log"
  wait_ready "$ORIGIN_PID" "http://127.0.0.1:$UP_H2/" "origin nginx (h2c)" "$d/error.log" --http2-prior-knowledge
}

# -- nginx reverse proxy
start_nginx() { # WORKERS PIN...
  local n="$1" d="$RUN_DIR"; shift
  mkdir -p "$d"
  {
    nginx_common "$d" "$n"
    echo "http {"
    nginx_http_common "$d"
    cat <<EOF
  upstream origin {
    server 127.0.0.1:$UP_H1;
    keepalive 64;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
  }
  server {
    listen 127.0.0.1:$NGINX_H1;
    $(nginx_h2_listen "$NGINX_H2")
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
  } >"$d/nginx.conf"
  nginx_args "$d"
  start_bg "$d/stderr.log" "$@" nginx "${NGINX_ARGS[@]}"
  PROXY_PID=$LAST_PID
  wait_ready "$PROXY_PID" "http://127.0.0.1:$NGINX_H1/" "nginx" "$d/error.log"
  wait_ready "$PROXY_PID" "http://127.0.0.1:$NGINX_H2/" "nginx (h2c)" "$d/error.log" --http2-prior-knowledge
}

# -- HAProxy
start_haproxy() { # THREADS PIN...
  local n="$1" d="$RUN_DIR"; shift
  mkdir -p "$d"
  cat >"$d/haproxy.cfg" <<EOF
global
  nbthread $n
  maxconn 8000
  ${HAPROXY_AFFINITY:-}

defaults
  mode http
  maxconn 8000
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  timeout http-keep-alive 300s
  option http-keep-alive
  http-reuse always

frontend h1
  bind 127.0.0.1:$HAPROXY_H1
  default_backend origin

frontend h2c
  bind 127.0.0.1:$HAPROXY_H2 proto h2
  default_backend origin

backend origin
  server origin 127.0.0.1:$UP_H1
EOF
  start_bg "$d/haproxy.log" "$@" haproxy -db -f "$d/haproxy.cfg"
  PROXY_PID=$LAST_PID
  wait_ready "$PROXY_PID" "http://127.0.0.1:$HAPROXY_H1/" "haproxy" "$d/haproxy.log"
  wait_ready "$PROXY_PID" "http://127.0.0.1:$HAPROXY_H2/" "haproxy (h2c)" "$d/haproxy.log" --http2-prior-knowledge
}

# -- Portico: one control plane for the whole run, a fresh portico-dp per run.
CP_PID=""
start_cp() {
  local d="$TMP/cp" i
  mkdir -p "$d/data"
  start_bg "$d/portico-cp.log" env -u PORTICO_ADMIN_TOKEN PORTICO_LOG="${PORTICO_LOG:-warn}" \
    "$BIN/portico-cp" --data-dir "$d/data" --admin-listen 127.0.0.1:0 --xds-listen 127.0.0.1:0
  CP_PID=$LAST_PID
  for ((i = 0; i < READY_SECS * 10; i++)); do
    [ -s "$d/data/admin.addr" ] && [ -s "$d/data/xds.addr" ] && [ -s "$d/data/admin.token" ] && break
    alive "$CP_PID" || { cat "$d/portico-cp.log" >&2; die "portico-cp exited during start-up"; }
    sleep 0.1
  done
  [ -s "$d/data/admin.addr" ] && [ -s "$d/data/xds.addr" ] && [ -s "$d/data/admin.token" ] \
    || { cat "$d/portico-cp.log" >&2; die "portico-cp did not write admin.addr/xds.addr/admin.token within ${READY_SECS} s"; }
  XDS_ADDR="$(tr -d '[:space:]' <"$d/data/xds.addr")"
  sed -e '/^#/d' -e "s/\bPROXY_PORT\b/$PORTICO_PORT/g" -e "s/\bUPSTREAM_PORT\b/$UP_H1/g" \
    "$BENCH_CONFIG" >"$TMP/portico.yaml"
  echo '{}' >"$d/cli-config.yaml"
  env -u PORTICO_TOKEN PORTICO_CONFIG="$d/cli-config.yaml" \
    PORTICO_SERVER="$(tr -d '[:space:]' <"$d/data/admin.addr")" \
    PORTICO_TOKEN_FILE="$d/data/admin.token" \
    "$BIN/portico" apply -f "$TMP/portico.yaml" -m "bench/dp.sh" >"$d/apply.log" 2>&1 \
    || { cat "$d/apply.log" >&2; die "portico apply failed"; }
}

start_portico() { # BINARY WORKERS PIN...
  local dp="$1" n="$2" d="$RUN_DIR"; shift 2
  [ -n "$CP_PID" ] || start_cp
  mkdir -p "$d"
  rm -f "$d/admin.addr"
  start_bg "$d/portico-dp.log" env PORTICO_LOG="${PORTICO_LOG:-warn}" "$@" "$dp" \
    --xds "$XDS_ADDR" --node-id bench-1 --node-group bench \
    --admin-listen 127.0.0.1:0 --admin-address-path "$d/admin.addr" --workers "$n" \
    "${PORTICO_AFFINITY[@]}"
  PROXY_PID=$LAST_PID
  wait_ready "$PROXY_PID" "http://127.0.0.1:$PORTICO_PORT/" "portico-dp" "$d/portico-dp.log"
  wait_ready "$PROXY_PID" "http://127.0.0.1:$PORTICO_PORT/" "portico-dp (h2c)" "$d/portico-dp.log" --http2-prior-knowledge
}

# -- The floor: bench/src/bin/relay.rs, MODE epoll or uring.
start_relay() { # MODE THREADS PIN...
  local mode="$1" n="$2" d="$RUN_DIR"; shift 2
  mkdir -p "$d"
  start_bg "$d/relay.log" "$@" "$BIN/relay" "$mode" "127.0.0.1:$RELAY_PORT" "127.0.0.1:$UP_H1" "$n"
  PROXY_PID=$LAST_PID
  wait_ready "$PROXY_PID" "http://127.0.0.1:$RELAY_PORT/" "relay ($mode)" "$d/relay.log"
}

# ------------------------------------------------------------ measuring ----
cpu_ns() { # PIDS... : ns on CPU, summed over all threads
  local total=0 pid f v _
  for pid in "$@"; do
    for f in /proc/"$pid"/task/*/schedstat; do
      { read -r v _ <"$f"; } 2>/dev/null || continue
      total=$((total + v))
    done
  done
  echo "$total"
}
# PIDS... : "USER SYSTEM", clock ticks summed over the processes (all their
# threads). Only their ratio is used: it splits schedstat's exact time into
# user space and kernel. With tick-based accounting (no IRQ time accounting)
# a softirq that runs in a task's context counts as that task's system time.
user_sys_ticks() {
  local u=0 s=0 pid line rest
  for pid in "$@"; do
    { read -r line <"/proc/$pid/stat"; } 2>/dev/null || continue
    rest="${line##*) }" # after the command name, which may hold spaces
    read -r _ _ _ _ _ _ _ _ _ _ _ ut st _ <<<"$rest"
    u=$((u + ut)) s=$((s + st))
  done
  echo "$u $s"
}
rss_kib() { # PIDS... : VmRSS summed
  local total=0 pid k v _
  for pid in "$@"; do
    while read -r k v _; do
      [ "$k" = "VmRSS:" ] && total=$((total + v))
    done 2>/dev/null <"/proc/$pid/status" || true
  done
  echo "$total"
}

# /proc/stat, all CPUs: "busy_ns steal_ns" (busy = user + nice + system + irq
# + softirq: a task's schedstat time includes the softirqs run in its context).
CLK_TCK="$(getconf CLK_TCK 2>/dev/null || echo 100)"
stat_ns() {
  local _c u n sy _i _w q sq st _
  read -r _c u n sy _i _w q sq st _ </proc/stat
  echo "$(((u + n + sy + q + sq) * 1000000000 / CLK_TCK)) $((st * 1000000000 / CLK_TCK))"
}
# CPU time of this shell's finished children (so: of the load generator), in
# CHILDREN_NS; not to be called in a subshell, which has children of its own.
children_ns() {
  times >"$TMP/times"
  CHILDREN_NS="$(awk 'NR == 2 { t = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] }
                 printf "%.0f\n", t * 1e9 }' "$TMP/times")"
}

# wrk output -> "rps p50_ms p99_ms requests errors"
parse_wrk() {
  awk '
    function ms(s,   v) {
      v = s + 0
      if (s ~ /us$/) return v / 1000
      if (s ~ /ms$/) return v
      if (s ~ /m$/)  return v * 60000
      if (s ~ /s$/)  return v * 1000
      return v
    }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    / requests in / { req = $1 }
    /^Requests\/sec:/ { rps = $2 }
    /Non-2xx or 3xx responses:/ { err += $NF }
    /Socket errors:/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) err += $i + 0 }
    END {
      if (req == "" || rps == "") exit 1
      printf "%s %s %s %s %d\n", rps, p50, p99, req, err
    }' "$1"
}

# h2load output + its --log-file -> "rps p50_ms p99_ms requests errors"
parse_h2load() {
  local out="$1" logf="$2" pct
  pct="$(cut -f3 "$logf" | sort -n | awk '
    { v[NR] = $1 }
    function at(p,   i) { i = int(p * NR); if (i < p * NR) i++; if (i < 1) i = 1; return v[i] / 1000 }
    END { if (NR == 0) print "nan nan"; else printf "%.4f %.4f\n", at(0.50), at(0.99) }')"
  awk -v pct="$pct" '
    /^finished in/ { for (i = 1; i <= NF; i++) if ($(i + 1) ~ /^req\/s/) rps = $i }
    /^requests:/ {
      for (i = 2; i <= NF; i++) {
        w = $(i + 1); sub(/,$/, "", w)
        if (w == "done") done = $i + 0
        if (w == "failed" || w == "timeout") err += $i + 0
      }
    }
    /^status codes:/ { for (i = 3; i <= NF; i++) if ($(i + 1) ~ /^[45]xx/) err += $i + 0 }
    END {
      if (rps == "" || done == "") exit 1
      split(pct, p, " ")
      printf "%s %s %s %d %d\n", rps, p[1], p[2], done, err
    }' "$out"
}

declare -A R_RPS R_P50 R_P99 R_RSS R_CPU R_SYS R_ERR R_BG R_STEAL R_ALL R_ALLCPU

# measure LAYOUT PROXY PROTO PORT
measure() { # LAYOUT PROXY PROTO PORT REPEAT-INDEX
  local layout="$1" proxy="$2" proto="$3" port="$4" r="$5"
  local key="$layout/$proto/$proxy#$r" label="$layout-$proxy-$proto${REPEAT_SUFFIX}"
  local url="http://127.0.0.1:$port/" pids="" before=0 after=0 parsed rps p50 p99 req err
  local ticks0="0 0" ticks1="0 0"
  local origin_pids o0 o1 c0 c1 s0 s1 st0 st1 w0 w1
  local out="$RAW/$label.txt"
  say "$layout / $proto / $proxy${REPEAT_SUFFIX}: warm-up ${WARMUP}s, then ${DURATION}s on $url"
  if [ "$proto" = h1 ]; then
    "${PIN_LOAD[@]}" wrk -t1 -c"$WRK_CONNS" -d"${WARMUP}s" "$url" >"$RAW/$label.warmup.txt" 2>&1 \
      || die "wrk warm-up failed: $RAW/$label.warmup.txt"
  else
    "${PIN_LOAD[@]}" h2load -c"$H2_CONNS" -m"$H2_STREAMS" -D "$WARMUP" "$url" >"$RAW/$label.warmup.txt" 2>&1 \
      || die "h2load warm-up failed: $RAW/$label.warmup.txt"
  fi
  if [ "$proxy" != direct ]; then
    pids="$(proc_tree "$PROXY_PID")"
    # shellcheck disable=SC2086
    before="$(cpu_ns $pids)"
    # shellcheck disable=SC2086
    ticks0="$(user_sys_ticks $pids)"
  fi
  # Everything else that ran meanwhile: system task time minus the proxy, the
  # origin and the load generator (a check that the machine was quiet).
  origin_pids="$(proc_tree "$ORIGIN_PID")"
  # shellcheck disable=SC2086
  o0="$(cpu_ns $origin_pids)"; children_ns; c0="$CHILDREN_NS"; read -r s0 st0 <<<"$(stat_ns)"; w0="$(date +%s%N)"
  if [ "$proto" = h1 ]; then
    "${PIN_LOAD[@]}" wrk -t1 -c"$WRK_CONNS" -d"${DURATION}s" --latency "$url" >"$out" 2>&1 \
      || die "wrk failed: $out"
  else
    "${PIN_LOAD[@]}" h2load -c"$H2_CONNS" -m"$H2_STREAMS" -D "$DURATION" \
      --log-file "$RAW/$label.h2load.log" "$url" >"$out" 2>&1 \
      || die "h2load failed: $out"
  fi
  w1="$(date +%s%N)"; read -r s1 st1 <<<"$(stat_ns)"; children_ns; c1="$CHILDREN_NS"
  # shellcheck disable=SC2086
  o1="$(cpu_ns $origin_pids)"
  if [ "$proxy" != direct ]; then
    # shellcheck disable=SC2086
    after="$(cpu_ns $pids)"
    # shellcheck disable=SC2086
    ticks1="$(user_sys_ticks $pids)"
    # shellcheck disable=SC2046
    R_RSS[$key]="$(awk -v k="$(rss_kib $(proc_tree "$PROXY_PID"))" 'BEGIN { printf "%.1f", k / 1024 }')"
  fi
  if [ "$proto" = h1 ]; then
    parsed="$(parse_wrk "$out")" || die "cannot parse wrk output: $out"
  else
    parsed="$(parse_h2load "$out" "$RAW/$label.h2load.log")" || die "cannot parse h2load output: $out"
    gzip -f "$RAW/$label.h2load.log" 2>/dev/null || true
  fi
  read -r rps p50 p99 req err <<<"$parsed"
  R_RPS[$key]="$(awk -v x="$rps" 'BEGIN { printf "%.0f", x }')"
  R_P50[$key]="$(awk -v x="$p50" 'BEGIN { printf "%.3f", x }')"
  R_P99[$key]="$(awk -v x="$p99" 'BEGIN { printf "%.3f", x }')"
  R_ERR[$key]="$err"
  if [ "$proxy" != direct ]; then
    R_CPU[$key]="$(awk -v d="$((after - before))" -v n="$req" 'BEGIN { if (n > 0) printf "%.2f", d / 1000 / n; else print "n/a" }')"
    # The kernel's part of it: system time's share of the ticks, applied to
    # the exact time.
    R_SYS[$key]="$(awk -v d="$((after - before))" -v n="$req" -v a="$ticks0" -v b="$ticks1" 'BEGIN {
      split(a, x, " "); split(b, y, " "); u = y[1] - x[1]; s = y[2] - x[2]
      if (n > 0 && u + s > 0) printf "%.2f", d / 1000 / n * s / (u + s); else print "n/a" }')"
  fi
  printf 'wall_ns %s\nsystem_busy_ns %s\nsteal_ns %s\nproxy_ns %s\norigin_ns %s\nload_generator_ns %s\n' \
    "$((w1 - w0))" "$((s1 - s0))" "$((st1 - st0))" "$((after - before))" "$((o1 - o0))" "$((c1 - c0))" \
    >"$RAW/$label.cpu.txt"
  R_BG[$key]="$(awk -v t="$((s1 - s0))" -v p="$((after - before))" -v o="$((o1 - o0))" -v c="$((c1 - c0))" \
    -v w="$((w1 - w0))" 'BEGIN { x = (t - p - o - c) / w * 100; if (x < 0) x = 0; printf "%.0f", x }')"
  R_STEAL[$key]="$(awk -v st="$((st1 - st0))" -v w="$((w1 - w0))" 'BEGIN { printf "%.1f", st / w * 100 }')"
  if [ "${R_BG[$key]}" -gt "$BUSY_WARN" ]; then
    say "  warning: other work used ${R_BG[$key]}% of a core during this run"
  fi
  say "  ${R_RPS[$key]} req/s, p50 ${R_P50[$key]} ms, p99 ${R_P99[$key]} ms, RSS ${R_RSS[$key]:-n/a} MiB, CPU ${R_CPU[$key]:-n/a} µs/req (kernel ${R_SYS[$key]:-n/a}), errors $err; other CPU ${R_BG[$key]}% of a core, steal ${R_STEAL[$key]}%"
}

proxy_name() {
  case "$1" in
    direct) echo "direct (no proxy)" ;;
    nginx) echo "nginx $NGINX_VERSION" ;;
    haproxy) echo "haproxy $HAPROXY_VERSION" ;;
    portico) echo "portico-dp" ;;
    portico-pgo) echo "portico-dp (PGO)" ;;
    relay) echo "minimal relay, epoll (floor)" ;;
    relay-uring) echo "minimal relay, io_uring (floor)" ;;
  esac
}

port_of() { # PROXY PROTO
  case "$1/$2" in
    direct/h1) echo "$UP_H1" ;; direct/h2) echo "$UP_H2" ;;
    nginx/h1) echo "$NGINX_H1" ;; nginx/h2) echo "$NGINX_H2" ;;
    haproxy/h1) echo "$HAPROXY_H1" ;; haproxy/h2) echo "$HAPROXY_H2" ;;
    portico*/*) echo "$PORTICO_PORT" ;;
    relay*/h1) echo "$RELAY_PORT" ;;
  esac
}

# -------------------------------------------------------- instructions -----
# Sums the Ir totals of callgrind's dumps in DIR (files cg.PID.N).
dumped_ir() {
  local f total=0 v
  for f in "$1"/cg.*.[0-9]*; do
    [ -e "$f" ] || continue
    v="$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$f" | tail -n1)"
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

run_instructions() {
  local n="${INSTR_REQUESTS:-20000}" proxy proto url pids ir load=()
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "INSTR_REQUESTS must be a positive integer (got '$n')"
  READY_SECS=120 # everything is slow under valgrind
  NGINX_MASTER=off # a forked worker escapes callgrind_control
  layout=instructions
  start_origin
  for proxy in $PROXIES; do
    [ "$proxy" = direct ] && continue
    # valgrind does not follow what the kernel writes through the ring.
    [ "$proxy" = relay-uring ] && { say "instructions: relay-uring left out (valgrind does not see io_uring's work)"; continue; }
    for proto in $PROTOCOLS; do
      serves "$proxy" "$proto" || continue
      RUN_DIR="$TMP/runs/instructions-$proxy-$proto"
      mkdir -p "$RUN_DIR"
      local vg=(valgrind --tool=callgrind --callgrind-out-file="$RUN_DIR/cg.%p" --dump-instr=no)
      case "$proxy" in
        nginx) start_nginx 1 "${vg[@]}" ;;
        haproxy) start_haproxy 1 "${vg[@]}" ;;
        portico*) start_portico "$(dp_binary "$proxy")" 1 "${vg[@]}" ;;
        relay) start_relay epoll 1 "${vg[@]}" ;;
      esac
      url="http://127.0.0.1:$(port_of "$proxy" "$proto")/"
      load=(h2load -c"$H2_CONNS" -m1)
      [ "$proto" = h1 ] && load=(h2load --h1 -c"$WRK_CONNS" -m1)
      say "instructions / $proto / $proxy: warm-up, then $n requests on $url"
      "${load[@]}" -n 2000 "$url" >"$RAW/instructions-$proxy-$proto.warmup.txt" 2>&1 \
        || die "warm-up failed: $RAW/instructions-$proxy-$proto.warmup.txt"
      pids="$(proc_tree "$PROXY_PID")"
      # shellcheck disable=SC2086
      callgrind_control -z $pids >/dev/null 2>&1 || true
      "${load[@]}" -n "$n" "$url" >"$RAW/instructions-$proxy-$proto.txt" 2>&1 \
        || die "load failed: $RAW/instructions-$proxy-$proto.txt"
      grep -q "^requests: $n total, $n started, $n done, $n succeeded" "$RAW/instructions-$proxy-$proto.txt" \
        || die "not every request succeeded: $RAW/instructions-$proxy-$proto.txt"
      # shellcheck disable=SC2086
      callgrind_control -d $pids >/dev/null 2>&1 || die "callgrind_control -d failed for $proxy"
      ir="$(dumped_ir "$RUN_DIR")"
      [ "$ir" -gt 0 ] || die "no callgrind dump for $proxy in $RUN_DIR"
      R_CPU["$proto/$proxy"]=$((ir / n))
      say "  ${R_CPU["$proto/$proxy"]} instructions per request"
      stop_tree "$PROXY_PID"
    done
  done
  stop_tree "$ORIGIN_PID"
  {
    echo "## Data plane: user-space instructions per request (\`bash bench/dp.sh --instructions\`)"
    echo
    echo "Run $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); valgrind $(valgrind --version 2>/dev/null | sed 's/valgrind-//'), nginx $NGINX_VERSION, haproxy $HAPROXY_VERSION."
    echo "Each proxy with one worker under callgrind, $n requests counted after 2000 of warm-up: HTTP/1.1 \`h2load --h1 -c$WRK_CONNS\`, h2c \`h2load -c$H2_CONNS -m1\`; the origin as in the main benchmark. Kernel time is not counted."
    echo "Portico configuration: \`${BENCH_CONFIG#"$PWD"/}\`."
    echo
    echo "| proxy | HTTP/1.1 instr/req | h2c instr/req |"
    echo "|---|---:|---:|"
    for proxy in $PROXIES; do
      [ "$proxy" = direct ] || [ "$proxy" = relay-uring ] && continue
      echo "| $proxy | ${R_CPU["h1/$proxy"]:-n/a} | ${R_CPU["h2/$proxy"]:-n/a} |"
    done
    for dp in "${PORTICOS[@]}" "${RELAYS[@]}"; do
      [ "$dp" = relay-uring ] && continue
      for peer in nginx haproxy; do
        want "$peer" || continue
        echo "| $(proxy_name "$dp") ÷ $peer | $(ratio "${R_CPU["h1/$dp"]:-}" "${R_CPU["h1/$peer"]:-}") | $(ratio "${R_CPU["h2/$dp"]:-}" "${R_CPU["h2/$peer"]:-}") |"
      done
    done
  } | tee "$TMP/instructions.md"
  mkdir -p bench/dp
  cp "$TMP/instructions.md" bench/dp/last-instructions.md
  echo "written: bench/dp/last-instructions.md" >&2
}

ratio() { # A B -> "1.23×" or n/a
  awk -v a="${1:-}" -v b="${2:-}" 'BEGIN {
    if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b + 0 > 0) printf "%.2f×", a / b; else print "n/a" }'
}

if $instructions; then
  run_instructions
  exit 0
fi

# ---------------------------------------------------------------- runs -----
# How busy the machine is before we start, in % of one core over 1 s.
read -r s0 _ <<<"$(stat_ns)"; sleep 1; read -r s1 _ <<<"$(stat_ns)"
START_BUSY="$(awk -v d="$((s1 - s0))" 'BEGIN { printf "%.0f", d / 1e7 }')"
if [ "$START_BUSY" -gt "$BUSY_WARN" ]; then
  say "warning: the machine is already busy (${START_BUSY}% of a core); other work will skew the numbers"
fi
for layout in $LAYOUTS; do
  NGINX_AFFINITY="" HAPROXY_AFFINITY="" PORTICO_AFFINITY=()
  if [ "$layout" = pinned ]; then
    PIN_PROXY=(taskset -c 1); PIN_LOAD=(taskset -c 0); PIN_ORIGIN=(taskset -c 0); workers=1
  else
    PIN_PROXY=(); PIN_LOAD=(); PIN_ORIGIN=(); workers="$UNPINNED_WORKERS"
  fi
  if [ "$layout" = affinity ]; then
    NGINX_AFFINITY="worker_cpu_affinity auto;"
    HAPROXY_AFFINITY="cpu-map auto:1/1-$workers 0-$((workers - 1))"
    PORTICO_AFFINITY=(--cpu-affinity)
  fi
  # The origin keeps its one worker unpinned in every layout but pinned.
  NGINX_AFFINITY="" start_origin "${PIN_ORIGIN[@]}"
  # Repeats go round all proxies in turn, so slow drifts of the machine
  # spread over every proxy alike.
  for ((r = 1; r <= REPEAT; r++)); do
    REPEAT_SUFFIX=""
    [ "$REPEAT" -eq 1 ] || REPEAT_SUFFIX="-$r"
    for proxy in $PROXIES; do
      for proto in $PROTOCOLS; do
        serves "$proxy" "$proto" || continue
        # A fresh proxy for every run, so RSS and CPU belong to that run
        # only; its config and logs go to runs/LAYOUT-PROXY-PROTO[-REPEAT].
        RUN_DIR="$TMP/runs/$layout-$proxy-$proto$REPEAT_SUFFIX"
        case "$proxy" in
          direct) ;;
          nginx) start_nginx "$workers" "${PIN_PROXY[@]}" ;;
          haproxy) start_haproxy "$workers" "${PIN_PROXY[@]}" ;;
          portico*) start_portico "$(dp_binary "$proxy")" "$workers" "${PIN_PROXY[@]}" ;;
          relay) start_relay epoll "$workers" "${PIN_PROXY[@]}" ;;
          relay-uring) start_relay uring "$workers" "${PIN_PROXY[@]}" ;;
        esac
        measure "$layout" "$proxy" "$proto" "$(port_of "$proxy" "$proto")" "$r"
        [ "$proxy" = direct ] || stop_tree "$PROXY_PID"
      done
    done
  done
  stop_tree "$ORIGIN_PID"
done

# Each row is the run with the median req/s (the lower middle one for an even
# REPEAT); other CPU is the worst run's.
for layout in $LAYOUTS; do
  for proto in $PROTOCOLS; do
    for proxy in $PROXIES; do
      serves "$proxy" "$proto" || continue
      k="$layout/$proto/$proxy"
      mid="$(for ((r = 1; r <= REPEAT; r++)); do echo "${R_RPS[$k#$r]} $r"; done \
        | sort -n | awk -v n="$REPEAT" 'NR == int((n + 1) / 2) { print $2 }')"
      for v in R_RPS R_P50 R_P99 R_RSS R_CPU R_SYS R_ERR R_STEAL; do
        declare -n arr="$v"
        # shellcheck disable=SC2004 # arr is associative
        [ -z "${arr[$k#$mid]+x}" ] || arr[$k]="${arr[$k#$mid]}"
        unset -n arr
      done
      R_BG[$k]=0 R_ALL[$k]="" R_ALLCPU[$k]=""
      for ((r = 1; r <= REPEAT; r++)); do
        [ "${R_BG[$k#$r]}" -gt "${R_BG[$k]}" ] && R_BG[$k]="${R_BG[$k#$r]}"
        R_ALL[$k]+="${R_ALL[$k]:+/}${R_RPS[$k#$r]}"
        R_ALLCPU[$k]+="${R_ALLCPU[$k]:+/}${R_CPU[$k#$r]:-n/a}"
      done
    done
  done
done

# -------------------------------------------------------------- report -----

REPORT="$TMP/report.md"
{
  echo "## Data plane: reverse proxies on loopback"
  echo
  echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') by \`bash bench/dp.sh\`, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
  echo "Machine: $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)), Linux $(uname -r); busy before the start: ${START_BUSY}% of a core."
  echo "Tools: nginx $NGINX_VERSION, haproxy $HAPROXY_VERSION, $(wrk -v 2>&1 | head -n1 | awk '{print $1, $2}'), h2load $(h2load --version 2>&1 | sed -n 's/.*nghttp2\/\([0-9.]*\).*/\1/p' | head -n1)."
  printf '%s\n' "Origin: a separate nginx, 1 worker, \`return 200 \"hello world\\n\"\`, HTTP/1.1 keep-alive to every proxy. The direct HTTP/2 row uses the origin's own h2c listener."
  echo "Portico configuration: \`${BENCH_CONFIG#"$PWD"/}\`."
  echo "Load: HTTP/1.1 \`wrk -t1 -c$WRK_CONNS -d${DURATION}s --latency\`; HTTP/2 (h2c, prior knowledge) \`h2load -c$H2_CONNS -m$H2_STREAMS -D $DURATION\`; each after a ${WARMUP}s warm-up, with a freshly started proxy."
  echo "Latency: wrk's percentiles for HTTP/1.1; for HTTP/2, nearest-rank percentiles of the per-request times in h2load's \`--log-file\`."
  echo "RSS: VmRSS summed over the proxy's processes after the run. CPU/req: the proxy's time on CPU (schedstat, all processes and threads) during the measured run ÷ completed requests."
  echo "Kernel/req: the part of CPU/req spent in the kernel (system time's share of user + system clock ticks in /proc/PID/stat, applied to CPU/req). It holds the proxy's system calls and the TCP work its sends do for their receivers on loopback (the softirqs run in the sender's context): work a proxy making the same calls cannot avoid, though its cost moves with cache effects."
  echo "Errors: wrk socket errors + non-2xx/3xx; h2load failed + timeouts + 4xx/5xx."
  echo "Other CPU: CPU time (user + system + irq + softirq in /proc/stat) used during a measured run by anything but the proxy, the origin and the load generator, in % of one core; above ${BUSY_WARN}% the run was disturbed."
  for layout in $LAYOUTS; do
    for proto in $PROTOCOLS; do
      echo
      case "$layout" in
        pinned) desc="pinned: proxy on CPU 1 with 1 worker; load generator and origin on CPU 0" ;;
        unpinned) desc="unpinned: nothing pinned; proxies with $UNPINNED_WORKERS workers" ;;
        affinity) desc="affinity: as unpinned, each proxy pinning its $UNPINNED_WORKERS workers one per CPU itself" ;;
      esac
      if [ "$proto" = h1 ]; then pdesc="HTTP/1.1 (wrk)"; else pdesc="HTTP/2 h2c (h2load)"; fi
      echo "### $pdesc — $desc"
      echo
      echo "| proxy | req/s | p50 ms | p99 ms | RSS MiB | CPU µs/req | kernel µs/req | errors |"
      echo "|---|---:|---:|---:|---:|---:|---:|---:|"
      for proxy in $PROXIES; do
        serves "$proxy" "$proto" || continue
        k="$layout/$proto/$proxy"
        echo "| $(proxy_name "$proxy") | ${R_RPS[$k]:-n/a} | ${R_P50[$k]:-n/a} | ${R_P99[$k]:-n/a} | ${R_RSS[$k]:-n/a} | ${R_CPU[$k]:-n/a} | ${R_SYS[$k]:-n/a} | ${R_ERR[$k]:-n/a} |"
      done
      for dp in "${PORTICOS[@]}" "${RELAYS[@]}"; do for peer in nginx haproxy; do
        serves "$dp" "$proto" && want "$peer" || continue
        p="$layout/$proto/$dp" q="$layout/$proto/$peer"
        echo "| $(proxy_name "$dp") ÷ $peer | $(ratio "${R_RPS[$p]:-}" "${R_RPS[$q]:-}") | | $(ratio "${R_P99[$p]:-}" "${R_P99[$q]:-}") | | $(ratio "${R_CPU[$p]:-}" "${R_CPU[$q]:-}") | $(ratio "${R_SYS[$p]:-}" "${R_SYS[$q]:-}") | |"
      done; done
      bg="" steal=0 disturbed="" share=""
      for proxy in $PROXIES; do
        serves "$proxy" "$proto" || continue
        k="$layout/$proto/$proxy"
        bg+="${bg:+, }$proxy ${R_BG[$k]:-?}%"
        [ "$proxy" = direct ] \
          || share+="${share:+, }$proxy $(awk -v s="${R_SYS[$k]:-}" -v c="${R_CPU[$k]:-}" 'BEGIN { if (s + 0 > 0 && c + 0 > 0) printf "%.0f%%", s / c * 100; else print "n/a" }')"
        steal="$(awk -v a="$steal" -v b="${R_STEAL[$k]:-0}" 'BEGIN { print (b > a ? b : a) }')"
        [ "${R_BG[$k]:-0}" -gt "$BUSY_WARN" ] && disturbed+="${disturbed:+, }$proxy"
      done
      echo
      echo "Kernel's share of CPU/req: $share."
      echo "Other CPU during the runs: $bg; CPU steal at most $steal%.${disturbed:+ **Disturbed by other work: $disturbed.**}"
      if [ "$REPEAT" -gt 1 ]; then
        all="" cpus=""
        for proxy in $PROXIES; do
          serves "$proxy" "$proto" || continue
          all+="${all:+; }$proxy ${R_ALL[$layout/$proto/$proxy]}"
          [ "$proxy" = direct ] || cpus+="${cpus:+; }$proxy ${R_ALLCPU[$layout/$proto/$proxy]}"
        done
        echo "Median of $REPEAT runs by req/s; req/s of each run: $all; CPU µs/req of each run: $cpus."
      fi
    done
  done
  echo
  echo "Raw tool output: \`$TMP\`"
} >"$REPORT"

cat "$REPORT"
mkdir -p "$(dirname "$REPORT_FILE")"
cp "$REPORT" "$REPORT_FILE"
echo
echo "written: $REPORT_FILE; raw output: $TMP"
