# What benches/proxy.sh and benches/https.sh share (sourced, from the repository root): the tools check,
# the release build of the agent's examples, a scratch directory whose processes are stopped on exit,
# waiting for a port, the head of a foreground nginx config in that directory, and one wrk measurement.

# Fails unless every command named is installed.
need() {
  for t in "$@"; do
    command -v "$t" >/dev/null || { echo "$t is not installed" >&2; exit 1; }
  done
}

# Builds the backend (`ws_echo`) and the proxy alone (`node_proxy`); sets `bin` to where they are.
build_examples() {
  cargo build --release --locked -p cairn-agent --example ws_echo --example node_proxy >&2
  bin=target/release/examples
}

# A scratch directory `dir`; processes appended to `pids` are killed and it is removed on exit.
scratch() {
  dir="$(mktemp -d)"
  pids=()
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
}

# Waits (10 s at most) until something accepts connections on HOST:PORT.
wait_port() {
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  exit 1
}

# The head of an nginx config kept in `dir` (pid, logs, temp paths), up to the inside of `http {`.
nginx_head() {
  mkdir -p "$dir/tmp"
  cat <<CONF
daemon off;
worker_processes auto;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
CONF
}

# `measure LABEL WRK-ARGS...`: a 2 s warm-up, then `wrk -t2 -c$conns -d${secs}s --latency WRK-ARGS`;
# prints `RPS | P50 | P99` and reports non-2xx answers or socket errors on stderr under LABEL.
# `WRAP` (an array, possibly empty) runs wrk inside something (a mount namespace).
measure() {
  local label="$1"
  shift
  "${WRAP[@]}" wrk -t2 -c"$conns" -d2s "$@" >/dev/null
  local out
  out=$("${WRAP[@]}" wrk -t2 -c"$conns" -d"${secs}s" --latency "$@")
  local rps p50 p99 errors
  rps=$(awk '/^Requests\/sec:/ {printf "%d", $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  errors=$(grep -E 'Non-2xx|Socket errors' <<<"$out" || true)
  echo "$rps | $p50 | $p99"
  [ -z "$errors" ] || echo "  $label: $errors" >&2
}
