#!/usr/bin/env bash
# Smoke test of the stand-in kubelet against a REAL kube-apiserver 1.20 and a real kubectl:
#   kubectl -> kube-apiserver -> (direct TLS, kubelet-client cert) -> petrel-standin-kubelet
# Exercises logs, logs --tail, logs -f (push latency and close detection), exec (stdin
# round trip of random bytes, exit codes, stderr), attach, and port-forward.
#
# usage: real-apiserver-smoke.sh [WORKDIR]
# env:   KUBECTL (kubectl under test, default kubectl), SETUP_KUBECTL (creates the Node and Pod;
#        needs >= 1.24 for --subresource, default kubectl), STANDIN (default: target/debug/petrel-standin-kubelet),
#        K8S_SCRIPTS (default: e2e/k8s in this repository)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
K8S_SCRIPTS=${K8S_SCRIPTS:-$ROOT/e2e/k8s}
STANDIN=${STANDIN:-$ROOT/target/debug/petrel-standin-kubelet}
KUBECTL=${KUBECTL:-kubectl}
SETUP_KUBECTL=${SETUP_KUBECTL:-kubectl}
WORK=${1:-$(mktemp -d /tmp/standin-smoke.XXXXXX)}
mkdir -p "$WORK"
PIDS=()
FAILS=0
PASSES=0

log() { printf '[smoke] %s\n' "$*" >&2; }
pass() { PASSES=$((PASSES + 1)); log "PASS: $*"; }
fail() { FAILS=$((FAILS + 1)); log "FAIL: $*"; }
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  "$K8S_SCRIPTS/control-plane.sh" down "$WORK/cp" >/dev/null 2>&1 || true
}
trap cleanup EXIT

[[ -x $STANDIN ]] || { log "build it first: cargo build -p petrel-standin-kubelet"; exit 2; }
"$K8S_SCRIPTS/control-plane.sh" up "$WORK/cp" >/dev/null
eval "$("$K8S_SCRIPTS/control-plane.sh" env "$WORK/cp")"
k() { "$KUBECTL" "$@"; }
ks() { "$SETUP_KUBECTL" "$@"; }

# Start the stand-in kubelet with the apiserver-trusted serving cert; require the
# apiserver's kubelet-client cert.
"$STANDIN" --address 127.0.0.1:0 --read-only-port 0 --follow-interval-ms 0 \
  --cert "$K8S_KUBELET_SERVING_CERT" --key "$K8S_KUBELET_SERVING_KEY" --client-ca "$K8S_CA_CRT" \
  >"$WORK/standin.out" 2>"$WORK/standin.log" &
PIDS+=($!)
for _ in $(seq 50); do grep -q read-only "$WORK/standin.out" 2>/dev/null && break; sleep 0.1; done
PORT=$(sed -n 's/^listening https on .*:\([0-9]*\)$/\1/p' "$WORK/standin.out")
RO=$(sed -n 's/^listening read-only on \(.*\)$/\1/p' "$WORK/standin.out")
log "stand-in kubelet on port $PORT, read-only $RO"
state() { curl -sf "http://$RO/standin/state" | python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

ks create -f - >/dev/null <<EOF
apiVersion: v1
kind: Node
metadata: {name: n1}
EOF
ks patch node n1 --subresource=status --type=merge -p \
  "{\"status\":{\"addresses\":[{\"type\":\"InternalIP\",\"address\":\"127.0.0.1\"}],\"daemonEndpoints\":{\"kubeletEndpoint\":{\"Port\":$PORT}}}}" >/dev/null
ks create -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: p1, namespace: default}
spec:
  nodeName: n1
  automountServiceAccountToken: false
  containers: [{name: c1, image: standin}]
EOF
ks patch pod p1 --subresource=status --type=merge -p \
  '{"status":{"phase":"Running","conditions":[{"type":"Ready","status":"True"}],"containerStatuses":[{"name":"c1","image":"standin","imageID":"","ready":true,"restartCount":0,"started":true,"state":{"running":{"startedAt":"2024-01-01T00:00:00Z"}}}]}}' >/dev/null

# logs
out=$(k logs p1)
[[ $(wc -l <<<"$out") == 10 && $out == *"standin-kubelet log line 10 for default/p1/c1"* ]] && pass "logs" || fail "logs: $out"
out=$(k logs p1 --tail=2)
[[ $out == $'standin-kubelet log line 9 for default/p1/c1\nstandin-kubelet log line 10 for default/p1/c1' ]] && pass "logs --tail" || fail "logs --tail: $out"

# logs -f: a pushed line must show up within 200 ms; stopping kubectl must close the stream.
"$KUBECTL" logs -f p1 --tail=1 >"$WORK/follow.out" 2>&1 &
FPID=$!
for _ in $(seq 100); do grep -q "line 10" "$WORK/follow.out" && break; sleep 0.05; done
python3 - "$RO" "$WORK/follow.out" <<'EOF' && pass "logs -f push latency" || fail "logs -f push latency"
import sys, time, urllib.request
ro, path = sys.argv[1], sys.argv[2]
marker = "pushed-%d" % time.time_ns()
t0 = time.monotonic()
urllib.request.urlopen(urllib.request.Request("http://%s/standin/log/default/p1/c1" % ro, data=(marker + "\n").encode(), method="POST")).read()
while marker not in open(path).read():
    if time.monotonic() - t0 > 2: sys.exit("marker not seen")
    time.sleep(0.002)
dt = (time.monotonic() - t0) * 1000
print("[smoke] push->kubectl latency %.1f ms" % dt, file=sys.stderr)
sys.exit(0 if dt < 200 else 1)
EOF
[[ $(state follow_streams_open) == 1 ]] && pass "follow stream counted" || fail "follow stream not counted"
kill "$FPID"; t0=$(date +%s%N)
while [[ $(state follow_streams_open) != 0 ]]; do
  (( ($(date +%s%N) - t0) / 1000000 < 1000 )) || break
  sleep 0.02
done
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
[[ $(state follow_streams_open) == 0 ]] && pass "follow stream closed at kubelet in ${ms} ms" || fail "follow stream still open after ${ms} ms"

# exec
head -c 3000000 /dev/urandom >"$WORK/rand.bin"
k exec -i p1 -- cat <"$WORK/rand.bin" >"$WORK/rand.out"
cmp -s "$WORK/rand.bin" "$WORK/rand.out" && pass "exec -i cat (3 MB round trip)" || fail "exec -i cat"
out=$(k exec p1 -- echo hello world) && [[ $out == "hello world" ]] && pass "exec echo" || fail "exec echo: $out"
set +e
k exec p1 -- sh -c 'exit 3' 2>"$WORK/exit.err"; rc=$?
set -e
[[ $rc == 3 ]] && pass "exec exit code 3" || fail "exec exit code: $rc ($(cat "$WORK/exit.err"))"
set +e
k exec p1 -- nosuchcmd 2>"$WORK/nf.err"; rc=$?
set -e
[[ $rc == 127 && $(cat "$WORK/nf.err") == *"command not found"* ]] && pass "exec not found -> 127" || fail "exec not found: $rc $(cat "$WORK/nf.err")"
out=$(k exec p1 -c c1 -- sh -c 'echo a; echo b') && [[ $out == $'a\nb' ]] && pass "exec sh -c" || fail "exec sh -c: $out"

# attach (cat): stdin comes back on stdout
out=$(printf 'attached\n' | k attach -i p1 -c c1 2>/dev/null) && [[ $out == *attached* ]] && pass "attach -i" || fail "attach: $out"

# port-forward to a real local TCP service
python3 - >"$WORK/echo.port" <<'EOF' &
import socket, threading
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8)
print(s.getsockname()[1], flush=True)
def serve(c):
    data = b""
    while True:
        b = c.recv(65536)
        if not b: break
        data += b
    import hashlib
    c.sendall(("%s %d\n" % (hashlib.sha256(data).hexdigest(), len(data))).encode())
    c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
EOF
PIDS+=($!)
for _ in $(seq 50); do [[ -s $WORK/echo.port ]] && break; sleep 0.1; done
TPORT=$(cat "$WORK/echo.port")
"$KUBECTL" port-forward pod/p1 ":$TPORT" >"$WORK/pf.out" 2>&1 &
PFPID=$!; PIDS+=($PFPID)
for _ in $(seq 100); do grep -q "Forwarding from 127.0.0.1" "$WORK/pf.out" && break; sleep 0.1; done
LPORT=$(sed -n 's/^Forwarding from 127.0.0.1:\([0-9]*\) .*/\1/p' "$WORK/pf.out" | head -1)
ok=1
for i in 1 2 3; do
  python3 - "$LPORT" <<'EOF' || ok=0
import socket, sys, hashlib, os
data = os.urandom(1 << 20)
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
c.sendall(data); c.shutdown(socket.SHUT_WR)
got = b""
while True:
    b = c.recv(65536)
    if not b: break
    got += b
want = ("%s %d\n" % (hashlib.sha256(data).hexdigest(), len(data))).encode()
sys.exit(0 if got == want else "port-forward got %r" % got[:100])
EOF
done
[[ $ok == 1 ]] && pass "port-forward 3 x 1 MiB with half-close" || fail "port-forward ($(cat "$WORK/pf.out"))"
kill "$PFPID" 2>/dev/null || true

log "state: $(curl -sf "http://$RO/standin/state" | python3 -c 'import json,sys; d=json.load(sys.stdin); print({k: d[k] for k in ("websocket_upgrades_refused_total","spdy_connections_total","exec_sessions_total","port_forward_streams_total","https_client_common_names")})')"
log "kubectl: $("$KUBECTL" version --client 2>/dev/null | head -1)"
echo "$PASSES passed, $FAILS failed"
[[ $FAILS == 0 ]]
