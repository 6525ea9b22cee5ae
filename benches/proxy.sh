#!/usr/bin/env bash
# The node proxy against nginx (Debian's package), same backend, wrk with keep-alive (BENCHMARKS.md).
#
#   ./benches/proxy.sh [SECONDS] [CONNECTIONS]      # default 10 s, 64 connections
#
# Builds (release) the agent's examples `ws_echo` (the backend: `/` answers `ok`) and `node_proxy` (the
# node proxy alone), then measures, one after the other:
#   nginx local       wrk -> nginx -> backend
#   cairn local       wrk -> node proxy -> backend
#   nginx two hops    wrk -> nginx -> nginx -> backend (for reference)
#   cairn forwarded   wrk -> node proxy a (127.0.0.2, no replica) -> node proxy b (127.0.0.3) -> backend,
#                     over the authenticated internal hop
# nginx runs in the foreground (`daemon off`) with a generated config, pid and logs in a temp dir, as an
# equivalent reverse proxy: upstream keep-alive, HTTP/1.1, forwarding headers set, no response buffering
# (the node proxy streams). Needs nginx and wrk (apt-get install nginx-light wrk, or nginx).
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh

secs="${1:-10}"
conns="${2:-64}"
WRAP=()
need nginx wrk
build_examples
scratch

backend=127.0.0.1:18180
nginx_local=127.0.0.1:18181
nginx_front=127.0.0.1:18182
cairn_local=127.0.0.1:18183
cairn_a=127.0.0.2:18184
cairn_b=127.0.0.3:18185

LISTEN=$backend APP_NAME=bench "$bin/ws_echo" >/dev/null &
pids+=($!)

{ nginx_head; cat <<EOF
  upstream app { server $backend; keepalive 128; }
  upstream inner { server $nginx_local; keepalive 128; }
  server {
    listen $nginx_local;
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
  server {
    listen $nginx_front;
    location / {
      proxy_pass http://inner;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_buffering off;
    }
  }
}
EOF
} >"$dir/nginx.conf"
nginx -c "$dir/nginx.conf" -p "$dir" &
pids+=($!)

head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/hop.key"
cat >"$dir/cluster.json" <<EOF
{"generation": 1,
 "nodes": [{"name": "a", "addr": "$cairn_a"}, {"name": "b", "addr": "$cairn_b"}],
 "apps": [{"app": "app0", "hostnames": ["bench.test"], "nodes": ["b"]}]}
EOF
"$bin/node_proxy" --listen $cairn_local --route bench.test=$backend >/dev/null &
pids+=($!)
"$bin/node_proxy" --listen $cairn_b --route bench.test=$backend --node b \
  --cluster "$dir/cluster.json" --hop-key-file "$dir/hop.key" >/dev/null &
pids+=($!)
"$bin/node_proxy" --listen $cairn_a --node a \
  --cluster "$dir/cluster.json" --hop-key-file "$dir/hop.key" >/dev/null &
pids+=($!)
for a in $backend $nginx_local $nginx_front $cairn_local $cairn_a $cairn_b; do wait_port "$a"; done
for a in $nginx_local $nginx_front $cairn_local $cairn_a; do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: bench.test' "http://$a/" || true)
  [ "$code" = 200 ] || { echo "$a answers $code" >&2; exit 1; }
done

echo "| path | requests/s | p50 | p99 |"
echo "|---|---:|---:|---:|"
run() {
  echo "| $1 | $(measure "$1" -H 'Host: bench.test' "http://$2/") |"
}
run "nginx, local" $nginx_local
run "cairn node proxy, local" $cairn_local
run "nginx, two hops (reference)" $nginx_front
run "cairn node proxy, forwarded (a -> b)" $cairn_a
