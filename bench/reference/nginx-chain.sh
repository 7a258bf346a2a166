#!/usr/bin/env bash
# Writes an nginx config doing what a gateway's common chain does, as nginx users would configure it:
# 1,000 prefix routes /svc0/ ... /svc998/ plus a catch-all, an API-key check of header `apikey`
# against 10,000 keys key-0 ... key-9999 (401 otherwise), a per-key rate limit that never trips, an
# X-Request-Id header to the backend, and a JSON access log to a file. bench/gen_chain.py writes the
# Tollway config doing the same.
set -eu
work=${BENCH_TMP:-/tmp/tollway-bench}
out=${1:-$work/nginx-chain.conf}
mkdir -p "$work"
{
  echo 'map $http_apikey $key_ok { default 0;'
  for i in $(seq 0 9999); do echo "  key-$i 1;"; done
  echo '}'
} >"$work/nginx-keys.conf"
location='{ if ($key_ok = 0) { return 401; } limit_req zone=rl burst=100000 nodelay; proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header X-Request-Id $request_id; }'
{
  for i in $(seq 0 998); do echo "    location /svc$i/ $location"; done
  echo "    location / $location"
} >"$work/nginx-routes.conf"
cat >"$out" <<CONF
worker_processes 1;
daemon off;
pid $work/nginx-chain.pid;
error_log $work/nginx-chain-error.log warn;
events { worker_connections 4096; }
http {
  log_format json escape=json '{"time":"\$time_iso8601","client":"\$remote_addr","method":"\$request_method","uri":"\$request_uri","status":\$status,"bytes":\$body_bytes_sent,"request_time":\$request_time,"upstream_time":"\$upstream_response_time","request_id":"\$request_id"}';
  access_log $work/nginx-chain-access.log json;
  keepalive_requests 1000000;
  include $work/nginx-keys.conf;
  limit_req_zone \$http_apikey zone=rl:10m rate=1000000r/s;
  upstream be { server 127.0.0.1:9001; keepalive 64; }
  server {
    listen 127.0.0.1:9106 backlog=4096;
    include $work/nginx-routes.conf;
  }
}
CONF
echo "$out"
