#!/usr/bin/env bash
# HTTPS through the node proxy against nginx (Debian's package) with the same certificate, same backend,
# wrk (BENCHMARKS.md): keep-alive, and a new TLS connection per request (`Connection: close`).
#
#   ./benches/https.sh [SECONDS] [CONNECTIONS]      # default 10 s, 64 connections
#
# Builds (release) the agent's examples `ws_echo` (the backend) and `node_proxy` (the node proxy alone,
# `--tls-listen` with a TLS table file), makes an ECDSA P-256 certificate for `bench.test` with openssl,
# and runs nginx in the foreground with the same certificate (TLS 1.3 and 1.2, upstream keep-alive, no
# response buffering). wrk sends the URL's host as SNI, and the node proxy refuses a handshake without a
# name it serves, so wrk runs in a private mount namespace (`unshare -m`, root) where `/etc/hosts` maps
# `bench.test` to 127.0.0.1: the machine's own `/etc/hosts` is not touched.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh

secs="${1:-10}"
conns="${2:-64}"
need nginx wrk openssl unshare python3
build_examples
scratch

backend=127.0.0.1:18280
cairn_plain=127.0.0.1:18281
cairn_tls=127.0.0.1:18443
nginx_tls=127.0.0.1:18444

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=bench.test -addext subjectAltName=DNS:bench.test \
  -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
python3 - "$dir" <<'EOF'
import json, sys
d = sys.argv[1]
table = {"certificates": [{"id": "bench", "names": ["bench.test"],
                           "chain_pem": open(f"{d}/cert.pem").read(),
                           "key_pem": open(f"{d}/key.pem").read()}]}
open(f"{d}/tls.json", "w").write(json.dumps(table))
EOF
printf '127.0.0.1 localhost bench.test\n' >"$dir/hosts"

LISTEN=$backend APP_NAME=bench "$bin/ws_echo" >/dev/null &
pids+=($!)
"$bin/node_proxy" --listen $cairn_plain --route bench.test=$backend \
  --tls-listen $cairn_tls --tls-table "$dir/tls.json" >/dev/null &
pids+=($!)

{ nginx_head; cat <<EOF
  upstream app { server $backend; keepalive 128; }
  server {
    listen $nginx_tls ssl;
    server_name bench.test;
    ssl_certificate $dir/cert.pem;
    ssl_certificate_key $dir/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$remote_addr;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$host;
      proxy_buffering off;
    }
  }
}
EOF
} >"$dir/nginx.conf"
nginx -c "$dir/nginx.conf" -p "$dir" &
pids+=($!)
for a in $backend $cairn_tls $nginx_tls; do wait_port "$a"; done

# wrk (and curl for the check) with bench.test -> 127.0.0.1, in a mount namespace of their own.
in_ns() {
  unshare -m sh -c 'mount --bind "$0/hosts" /etc/hosts && shift && exec "$@"' "$dir" _ "$@"
}
for port in ${cairn_tls#*:} ${nginx_tls#*:}; do
  code=$(in_ns curl -s -o /dev/null -w '%{http_code}' --cacert "$dir/cert.pem" "https://bench.test:$port/" || true)
  [ "$code" = 200 ] || { echo "https://bench.test:$port answers $code" >&2; exit 1; }
done

echo "| path | connections | requests/s | p50 | p99 |"
echo "|---|---|---:|---:|---:|"
WRAP=(in_ns)
run() {
  local extra=()
  [ "$3" = new ] && extra=(-H 'Connection: close')
  echo "| $1 | $3 | $(measure "$1 ($3)" "${extra[@]}" "https://bench.test:$2/") |"
}
run "nginx" ${nginx_tls#*:} keep-alive
run "cairn node proxy" ${cairn_tls#*:} keep-alive
run "nginx" ${nginx_tls#*:} new
run "cairn node proxy" ${cairn_tls#*:} new
