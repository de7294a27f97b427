#!/usr/bin/env bash
# A throw-away Kubernetes control plane for Petrel's e2e tests: etcd + kube-apiserver v1.20.2 on
# 127.0.0.1, with no kubelet, scheduler or controller-manager.
#
#   control-plane.sh up DIR     PKI (made once, kept in DIR/pki), empty etcd, kube-apiserver;
#                               returns when /readyz answers ok
#   control-plane.sh down DIR   stop exactly the processes that `up` recorded in DIR, and wait
#   control-plane.sh env DIR    print DIR/paths.env as `export` lines: eval "$(... env DIR)"
#
# Env for `up`:
#   EGRESS_SELECTOR_CONFIG=FILE  passed as --egress-selector-config-file (apiserver->kubelet
#                                traffic through a CONNECT proxy, i.e. Petrel's hub)
#   APISERVER_EXTRA_FLAGS        more kube-apiserver flags, split on spaces (later flags win)
#   KUBELET_SERVING_SANS         extra SANs for the stand-in kubelets' serving cert, openssl
#                                syntax: "DNS:edge-a1,IP:127.0.0.2" (the cert is remade if it changes)
#   PROXY_SERVING_SANS           the same for the egress proxy's serving cert (TCP+mTLS egress)
#   K8S_READY_TIMEOUT            seconds to wait for /readyz (default 90)
#   KUBE_APISERVER, ETCD, KUBECTL  binaries (default: the cache of build-kube-apiserver.sh, which
#                                is run first if they are missing)
# Files in DIR: paths.env, kubeconfig, ca.crt, pki/, logs/{etcd,kube-apiserver}.log, *.pid,
# etcd-data/. Unix sockets: sun_path holds ~107 bytes, so keep DIR short if sockets go there.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_BIN=${PETREL_K8S_CACHE:-$HOME/.cache/petrel-k8s}/bin
READY_TIMEOUT=${K8S_READY_TIMEOUT:-90}

log() { printf '[control-plane] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
usage() { die "usage: $0 up|down|env DIR"; }

# ---------------------------------------------------------------------------------------------
# Processes

# True if PID is a live process (zombies count as exited).
alive() {
  local st
  [[ $1 =~ ^[0-9]+$ ]] || return 1
  { read -r st <"/proc/$1/stat"; } 2>/dev/null || return 1
  st=${st##*) } # the state follows the command name, which may contain spaces
  [[ ${st:0:1} != [ZX] ]]
}

# True if PID is alive and is one of ours. Before signalling a PID from a file we check that its
# command line mentions DIR: the file may be stale and the number reused by an unrelated process.
# While `up` runs, the PIDs are our own unreaped children (their numbers cannot be reused), and a
# child may not have exec'd etcd yet (its command line is still this script's): trust them.
ours() {
  local pid=$1 cmd
  alive "$pid" || return 1
  ((${OWN_CHILDREN:-0})) && return 0
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmd == *"$D/"* ]]
}

# Stop the process recorded in DIR/NAME.pid: TERM, then KILL after 15 s; wait until it is gone.
stop() {
  local f=$D/$1.pid pid i
  [[ -f $f ]] || return 0
  pid=$(<"$f")
  if ours "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do ours "$pid" || break; sleep 0.1; done
    if ours "$pid"; then
      log "$1 ($pid) ignored SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do ours "$pid" || break; sleep 0.1; done
      ours "$pid" && die "$1 ($pid) did not exit"
    fi
    log "stopped $1 ($pid)"
  fi
  rm -f "$f"
}

# Echo N distinct free 127.0.0.1 TCP ports. Ports in use are read from /proc/net/tcp{,6}; we pick
# below the kernel's ephemeral range so outgoing connections cannot take them meanwhile.
free_ports() {
  local n=$1 lo used=" " addr p out=()
  read -r lo _ </proc/sys/net/ipv4/ip_local_port_range
  ((lo > 20000)) || lo=32768
  # Column 2 of /proc/net/tcp is LOCALADDR:PORT with the port in hex.
  while read -r _ addr _; do
    [[ $addr == *:* ]] && used+="$((16#${addr##*:})) "
  done < <(cat /proc/net/tcp /proc/net/tcp6 2>/dev/null)
  while ((${#out[@]} < n)); do
    p=$((20000 + (RANDOM * 32768 + RANDOM) % (lo - 20000)))
    [[ $used == *" $p "* || " ${out[*]} " == *" $p "* ]] || out+=("$p")
  done
  echo "${out[*]}"
}

# ---------------------------------------------------------------------------------------------
# PKI (openssl). Everything is signed by one CA so that tests can trust a single ca.crt.

# leaf NAME SUBJECT EXTENSIONS: key + cert signed by the CA. EXTENSIONS is openssl x509v3 text.
leaf() {
  local name=$1 subj=$2 ext=$3
  printf '%s\n' "$ext" >"$P/$name.ext"
  openssl req -new -newkey rsa:2048 -nodes -subj "$subj" \
    -keyout "$P/$name.key" -out "$P/$name.csr" 2>/dev/null
  openssl x509 -req -in "$P/$name.csr" -CA "$P/ca.crt" -CAkey "$P/ca.key" \
    -set_serial "0x$(openssl rand -hex 8)" -days 3650 -sha256 \
    -extfile "$P/$name.ext" -out "$P/$name.crt" 2>/dev/null
  chmod 600 "$P/$name.key"
  rm -f "$P/$name.csr" "$P/$name.ext"
}

SERVER_EXT='basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth'
CLIENT_EXT='basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth'
LOOPBACK_SANS='IP:127.0.0.1,IP:::1,DNS:localhost'

# (Re)make a serving cert when its SAN list changed, e.g. a test added DNS:edge-b1.
serving_cert() { # NAME CN SANS
  if [[ -f $P/$1.crt && -f $P/$1.sans && $(<"$P/$1.sans") == "$3" ]]; then return 0; fi
  log "making the $1 serving cert for $3"
  leaf "$1" "/CN=$2" "$SERVER_EXT"$'\n'"subjectAltName = $3"
  printf '%s\n' "$3" >"$P/$1.sans"
}

gen_pki() {
  command -v openssl >/dev/null || die "openssl not found (apt-get install openssl)"
  mkdir -p "$P"
  if [[ ! -f $P/ca.key || ! -f $P/sa.pub ]]; then
    log "generating the CA and certificates in $P"
    rm -f "$P"/*.crt "$P"/*.key "$P"/*.pub "$P"/*.sans
    printf '%s\n' '[req]' 'distinguished_name = dn' '[dn]' '[ca]' \
      'basicConstraints = critical, CA:TRUE' \
      'keyUsage = critical, keyCertSign, cRLSign, digitalSignature' \
      'subjectKeyIdentifier = hash' >"$P/ca.cnf"
    openssl req -x509 -new -newkey rsa:2048 -nodes -days 3650 -sha256 -subj "/CN=petrel-e2e-ca" \
      -config "$P/ca.cnf" -extensions ca -keyout "$P/ca.key" -out "$P/ca.crt" 2>/dev/null
    rm -f "$P/ca.cnf"
    chmod 600 "$P/ca.key"
    # The apiserver's serving cert; 10.0.0.1 is the `kubernetes` Service IP of the range below.
    serving_cert apiserver kube-apiserver "$LOOPBACK_SANS,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    # kubectl / test client: system:masters bypasses RBAC.
    leaf admin "/O=system:masters/CN=petrel-e2e-admin" "$CLIENT_EXT"
    # apiserver -> kubelet client cert (--kubelet-client-certificate); stand-in kubelets
    # verify it against ca.crt, which proves a request really came from the apiserver.
    leaf apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$CLIENT_EXT"
    # apiserver -> egress proxy client cert (egress selector over TCP with mTLS).
    leaf proxy-client "/CN=kube-apiserver-proxy-client" "$CLIENT_EXT"
    # Service-account token signing key pair.
    openssl genrsa -out "$P/sa.key" 2048 2>/dev/null
    openssl rsa -in "$P/sa.key" -pubout -out "$P/sa.pub" 2>/dev/null
    chmod 600 "$P/sa.key"
  fi
  # Certs whose SANs the caller may extend, checked on every `up`.
  local ks=$LOOPBACK_SANS ps=$LOOPBACK_SANS
  [[ -z ${KUBELET_SERVING_SANS:-} ]] || ks+=",$KUBELET_SERVING_SANS"
  [[ -z ${PROXY_SERVING_SANS:-} ]] || ps+=",$PROXY_SERVING_SANS"
  serving_cert kubelet petrel-standin-kubelet "$ks"
  serving_cert proxy-server petrel-egress-proxy "$ps"
}

b64() { base64 -w0 <"$1"; }

# ---------------------------------------------------------------------------------------------
# up

# Start etcd and kube-apiserver once on fresh ports. Sets PORT_CLASH=1 and returns if a port
# was taken meanwhile (worth a retry); dies on any other failure. (It does not signal through its
# exit status: in `f || ...` bash would switch off `set -e` inside f.)
start_once() {
  PORT_CLASH=0
  local ports etcd_port peer_port port i n
  ports=$(free_ports 3)
  read -r etcd_port peer_port port <<<"$ports"
  ETCD_URL=http://127.0.0.1:$etcd_port
  SERVER=https://127.0.0.1:$port
  local peer_url=http://127.0.0.1:$peer_port

  # Every `up` starts from an empty etcd: no state leaks between test runs.
  rm -rf "$D/etcd-data"
  log "starting etcd on $ETCD_URL"
  nohup "$ETCD_BIN" --name petrel-e2e --data-dir "$D/etcd-data" \
    --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
    --listen-peer-urls "$peer_url" --initial-advertise-peer-urls "$peer_url" \
    --initial-cluster "petrel-e2e=$peer_url" --logger zap --log-level warn \
    </dev/null >"$D/logs/etcd.log" 2>&1 &
  echo $! >"$D/etcd.pid"
  for ((i = 0; ; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$etcd_port") 2>/dev/null && break
    if ! ours "$(<"$D/etcd.pid")"; then
      if grep -q 'address already in use' "$D/logs/etcd.log"; then PORT_CLASH=1; return 0; fi
      tail -n 30 "$D/logs/etcd.log" >&2
      die "etcd exited (log: $D/logs/etcd.log)"
    fi
    ((i < 150)) || { tail -n 30 "$D/logs/etcd.log" >&2; die "etcd not listening after 30 s"; }
    sleep 0.2
  done

  local extra=()
  read -r -a extra <<<"${APISERVER_EXTRA_FLAGS:-}"
  if [[ -n ${EGRESS_SELECTOR_CONFIG:-} ]]; then
    [[ -f $EGRESS_SELECTOR_CONFIG ]] || die "EGRESS_SELECTOR_CONFIG not found: $EGRESS_SELECTOR_CONFIG"
    extra=("--egress-selector-config-file=$EGRESS_SELECTOR_CONFIG" "${extra[@]}")
  fi
  log "starting kube-apiserver on $SERVER"
  # --kubelet-certificate-authority: the apiserver verifies the kubelets' serving certs (by
  #   default 1.20 does not), so a test sees a wrong SAN/CA through the tunnel as a real failure.
  # --disable-admission-plugins=ServiceAccount: no controller-manager mints SA tokens, so let
  #   Pods be created without a ServiceAccount.
  # --endpoint-reconciler-type=none: no `kubernetes` Endpoints pointing at 127.0.0.1.
  nohup "$APISERVER_BIN" \
    --etcd-servers="$ETCD_URL" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$port" \
    --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" \
    --client-ca-file="$P/ca.crt" \
    --authorization-mode=Node,RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
    --service-cluster-ip-range=10.0.0.0/24 \
    --kubelet-client-certificate="$P/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$P/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$P/ca.crt" \
    --disable-admission-plugins=ServiceAccount \
    --endpoint-reconciler-type=none \
    --profiling=false \
    "${extra[@]}" </dev/null >"$D/logs/kube-apiserver.log" 2>&1 &
  echo $! >"$D/kube-apiserver.pid"

  write_kubeconfig
  write_paths_env

  # Wait for /readyz; give up early if a process died.
  local kc=("$KUBECTL_BIN" --kubeconfig "$D/kubeconfig" --request-timeout=5s)
  local deadline=$((SECONDS + READY_TIMEOUT))
  until [[ $("${kc[@]}" get --raw /readyz 2>/dev/null) == ok ]]; do
    for n in etcd kube-apiserver; do
      if ! ours "$(<"$D/$n.pid")"; then
        if grep -q 'address already in use' "$D/logs/$n.log"; then PORT_CLASH=1; return 0; fi
        tail -n 30 "$D/logs/$n.log" >&2
        die "$n exited (log: $D/logs/$n.log)"
      fi
    done
    if ((SECONDS >= deadline)); then
      tail -n 30 "$D/logs/kube-apiserver.log" >&2
      "${kc[@]}" get --raw '/readyz?verbose' >&2 2>&1 || true
      die "kube-apiserver not ready after ${READY_TIMEOUT}s (log: $D/logs/kube-apiserver.log)"
    fi
    sleep 0.5
  done
}

write_kubeconfig() {
  cat >"$D/kubeconfig.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: petrel-e2e
  cluster:
    server: $SERVER
    certificate-authority-data: $(b64 "$P/ca.crt")
users:
- name: petrel-e2e-admin
  user:
    client-certificate-data: $(b64 "$P/admin.crt")
    client-key-data: $(b64 "$P/admin.key")
contexts:
- name: petrel-e2e
  context: {cluster: petrel-e2e, user: petrel-e2e-admin, namespace: default}
current-context: petrel-e2e
EOF
  chmod 600 "$D/kubeconfig.tmp"
  mv -f "$D/kubeconfig.tmp" "$D/kubeconfig"
}

write_paths_env() {
  {
    echo '# Written by control-plane.sh up. Source it, or eval the output of: control-plane.sh env DIR'
    printf '%s=%q\n' \
      K8S_DIR "$D" \
      KUBECONFIG "$D/kubeconfig" \
      K8S_SERVER "$SERVER" \
      K8S_ETCD_URL "$ETCD_URL" \
      K8S_KUBECTL "$KUBECTL_BIN" \
      K8S_CA_CRT "$D/ca.crt" \
      K8S_CA_KEY "$P/ca.key" \
      K8S_ADMIN_CERT "$P/admin.crt" \
      K8S_ADMIN_KEY "$P/admin.key" \
      K8S_KUBELET_CLIENT_CERT "$P/apiserver-kubelet-client.crt" \
      K8S_KUBELET_CLIENT_KEY "$P/apiserver-kubelet-client.key" \
      K8S_KUBELET_SERVING_CERT "$P/kubelet.crt" \
      K8S_KUBELET_SERVING_KEY "$P/kubelet.key" \
      K8S_PROXY_SERVER_CERT "$P/proxy-server.crt" \
      K8S_PROXY_SERVER_KEY "$P/proxy-server.key" \
      K8S_PROXY_CLIENT_CERT "$P/proxy-client.crt" \
      K8S_PROXY_CLIENT_KEY "$P/proxy-client.key" \
      K8S_SA_KEY "$P/sa.key" \
      K8S_SA_PUB "$P/sa.pub" \
      K8S_LOG_DIR "$D/logs"
  } >"$D/paths.env.tmp"
  mv -f "$D/paths.env.tmp" "$D/paths.env"
}

cmd_up() {
  APISERVER_BIN=${KUBE_APISERVER:-$CACHE_BIN/kube-apiserver}
  ETCD_BIN=${ETCD:-$CACHE_BIN/etcd}
  KUBECTL_BIN=${KUBECTL:-$CACHE_BIN/kubectl}
  if [[ ! -x $APISERVER_BIN || ! -x $ETCD_BIN || ! -x $KUBECTL_BIN ]]; then
    log "binaries missing; running build-kube-apiserver.sh (a few minutes)"
    "$HERE/build-kube-apiserver.sh" >/dev/null
  fi
  [[ -x $APISERVER_BIN ]] || die "kube-apiserver not found: $APISERVER_BIN"
  [[ -x $ETCD_BIN ]] || die "etcd not found: $ETCD_BIN"
  KUBECTL_BIN=$(command -v "$KUBECTL_BIN") || die "kubectl not found: ${KUBECTL:-}"
  for n in etcd kube-apiserver; do
    if [[ -f $D/$n.pid ]] && ours "$(<"$D/$n.pid")"; then die "$n already running; run: $0 down $D"; fi
  done
  ((${#D} <= 70)) || log "warning: DIR is ${#D} bytes long; unix sockets under it may exceed sun_path (~107 bytes)"

  gen_pki
  cp "$P/ca.crt" "$D/ca.crt"
  mkdir -p "$D/logs"

  # On any failure or interruption from here on, stop whatever was started.
  OWN_CHILDREN=1
  trap 'log "up failed; stopping"; stop kube-apiserver; stop etcd' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  local attempt
  for attempt in 1 2 3; do
    start_once
    ((PORT_CLASH)) || break
    log "a port was taken while starting (attempt $attempt); retrying on new ports"
    stop kube-apiserver
    stop etcd
  done
  ((!PORT_CLASH)) || die "could not find free ports"
  trap - EXIT INT TERM
  log "ready: $SERVER in ${SECONDS}s; kubeconfig $D/kubeconfig; stop with: $0 down $D"
}

cmd_down() {
  stop kube-apiserver
  stop etcd
}

cmd_env() {
  [[ -f $D/paths.env ]] || die "$D/paths.env not found (run: $0 up $D)"
  grep -v '^#' "$D/paths.env" | sed 's/^/export /'
}

[[ $# -eq 2 ]] || usage
if [[ $1 == up ]]; then mkdir -p "$2"; fi
[[ -d $2 ]] || die "no such directory: $2"
D=$(cd "$2" && pwd)
P=$D/pki
case $1 in
  up) cmd_up ;;
  down) cmd_down ;;
  env) cmd_env ;;
  *) usage ;;
esac
