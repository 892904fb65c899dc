#!/usr/bin/env bash
# The whole demo, end to end, on 127.0.0.1 only:
#   development certificates in a temporary directory -> server -> a few calls
#   -> a file up and down -> a short bench -> SIGTERM (the server drains and
#   exits 0).
set -euo pipefail
cd "$(dirname "$0")"

echo "== building (release)"
cargo build --release --quiet -p rpc-server -p rpc-client
# Wherever cargo puts binaries (CARGO_TARGET_DIR, a config file, ...).
TARGET=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
BIN="$TARGET/release"
DIR=$(mktemp -d)
SERVER=
STATUS=0
cleanup() {
    if [ -n "$SERVER" ] && kill -0 "$SERVER" 2>/dev/null; then kill "$SERVER"; fi
    # The server's log goes with the temporary directory: show it first if
    # the demo failed.
    if [ "$STATUS" -ne 0 ] && [ -s "$DIR/server.log" ]; then
        echo "== server log" >&2
        cat "$DIR/server.log" >&2
    fi
    rm -rf "$DIR"
}
trap 'STATUS=$?; cleanup' EXIT

echo "== 1. development certificates (rcgen), in $DIR"
"$BIN/rpc-server" gen-certs --out "$DIR"

echo "== 2. server on 127.0.0.1 (the OS picks the port), files under $DIR/files; its log is shown if the demo fails"
mkdir "$DIR/files"
"$BIN/rpc-server" --listen 127.0.0.1:0 --cert "$DIR/server.pem" --key "$DIR/server.key" \
    --files "$DIR/files" >"$DIR/server.out" 2>"$DIR/server.log" &
SERVER=$!
for _ in $(seq 100); do
    grep -q '^listening on ' "$DIR/server.out" && break
    sleep 0.1
done
ADDR=$(sed -n 's/^listening on //p' "$DIR/server.out")
if [ -z "$ADDR" ]; then
    echo "server did not start:" >&2
    cat "$DIR/server.log" >&2
    exit 1
fi
echo "listening on $ADDR"

client() {
    echo "\$ rpc-client $*"
    "$BIN/rpc-client" --connect "$ADDR" --ca "$DIR/ca.pem" "$@"
}

echo "== 3. calls (TLS 1.3, ALPN srpc/1, one connection per command)"
client call echo "hello, world"
client call add 2 3
client call sleep 100
client --meta tenant=demo --meta request-id=7 call metadata
# Any method, by the schema the server lists: JSON in, JSON out.
client describe Demo
client call Demo.add '{"a": 40, "b": 2}'
# This one must fail, with exit 1 and a deadline error: anything else stops
# the demo.
CODE=0
client --timeout 200ms call sleep 2000 2>"$DIR/deadline.err" || CODE=$?
cat "$DIR/deadline.err" >&2
if [ "$CODE" -ne 1 ] || ! grep -q 'deadline exceeded' "$DIR/deadline.err"; then
    echo "expected exit 1 with a deadline error, got exit $CODE" >&2
    exit 1
fi
echo "(failed as it should: the deadline passed)"

echo "== 4. a file up and down (a stream each way, SHA-256 checked on both sides)"
head -c 8000000 /dev/urandom >"$DIR/local.bin"
client upload "$DIR/local.bin" --name demo.bin
client files
client download demo.bin "$DIR/back.bin"
cmp "$DIR/local.bin" "$DIR/back.bin" && echo "(the same bytes came back)"

echo "== 5. bench: 64 concurrent callers on one connection, 64-byte payloads, 3 s"
client bench --concurrency 64 --payload 64 --duration 3s

echo "== 6. SIGTERM: the server drains and exits"
kill -TERM "$SERVER"
CODE=0
wait "$SERVER" || CODE=$?
SERVER=
echo "server exited with status $CODE"
exit "$CODE"
