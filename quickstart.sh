#!/usr/bin/env bash
# lockstep quickstart: builds lockstep, then runs a real replication on this host — an agent
# watching a demo directory, a receiver applying to a standby directory, dev certificates made
# on the fly, mutual TLS on loopback — changes a few files and shows the standby following,
# with status and lag. Everything lives in ./quickstart-demo; the daemons stop at the end.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release --bins -q
BIN=target/release
DEMO=$PWD/quickstart-demo
rm -rf "$DEMO"; mkdir -p "$DEMO/www/css" "$DEMO/standby"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo $((20000 + RANDOM % 20000)); }
RP=$(free_port); AA=$(free_port); RA=$(free_port); AM=$(free_port)

echo "== dev certificates (CA + agent web-1 + receiver eu-west)"
$BIN/lockstep-agent certs --out "$DEMO/certs" --agent web-1 --receiver eu-west
cat > "$DEMO/receiver.toml" <<TOML
id = "eu-west"
listen = "127.0.0.1:$RP"
data_dir = "receiver-data"
admin_listen = "127.0.0.1:$RA"
[tls]
ca = "certs/ca.pem"
cert = "certs/eu-west.pem"
key = "certs/eu-west.key"
[[targets]]
agent = "web-1"
source = "www"
kind = "fs"
path = "standby"
TOML
cat > "$DEMO/agent.toml" <<TOML
id = "web-1"
data_dir = "agent-data"
admin_listen = "127.0.0.1:$AA"
metrics_listen = "127.0.0.1:$AM"
[tls]
ca = "certs/ca.pem"
cert = "certs/web-1.pem"
key = "certs/web-1.key"
[[sources]]
name = "www"
kind = "fs"
path = "www"
[[receivers]]
name = "eu-west"
endpoint = "https://127.0.0.1:$RP"
TOML
echo "<h1>hello</h1>" > "$DEMO/www/index.html"
echo "body { color: black }" > "$DEMO/www/css/site.css"

$BIN/lockstep-receiver run --config "$DEMO/receiver.toml" 2> "$DEMO/receiver.log" & RPID=$!
$BIN/lockstep-agent run --config "$DEMO/agent.toml" 2> "$DEMO/agent.log" & APID=$!
trap 'kill $APID $RPID 2>/dev/null; wait 2>/dev/null || true' EXIT

wait_same() {
  for _ in $(seq 1 200); do
    if diff -r "$DEMO/www" "$DEMO/standby" >/dev/null 2>&1; then return 0; fi
    sleep 0.05
  done
  echo "standby did not catch up; see $DEMO/*.log" >&2; diff -r "$DEMO/www" "$DEMO/standby" || true; return 1
}
echo "== initial sync"; wait_same && echo "standby matches source"
echo "== changing files: edit, new directory, rename, delete, chmod, symlink"
echo "<h1>hello again</h1>" > "$DEMO/www/index.html"
mkdir -p "$DEMO/www/blog/2026" && echo "first post" > "$DEMO/www/blog/2026/post.md"
mv "$DEMO/www/css" "$DEMO/www/styles"
chmod 600 "$DEMO/www/index.html"
ln -s index.html "$DEMO/www/home.html"
dd if=/dev/urandom of="$DEMO/www/video.bin" bs=1M count=16 status=none
wait_same && echo "standby matches source"
echo "== tree of the standby"; (cd "$DEMO/standby" && find . | sort)
sleep 1
echo "== lockstep-agent status"; $BIN/lockstep-agent status --config "$DEMO/agent.toml"
echo "== lockstep-agent status --json"; $BIN/lockstep-agent status --config "$DEMO/agent.toml" --json
echo "== lockstep-receiver status"; $BIN/lockstep-receiver status --config "$DEMO/receiver.toml"
echo "== metrics (excerpt)"; (curl -s "http://127.0.0.1:$AM/metrics" 2>/dev/null || true) | grep -E '^lockstep_(replication|agent)' | head -12
echo "quickstart done: the demo lives in $DEMO (configs, certs, logs); daemons stopped."
