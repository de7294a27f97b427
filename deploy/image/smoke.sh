#!/usr/bin/env bash
# Smoke-tests the two image archives the way a runtime runs them, without a runtime: each
# image's layer is unpacked into its own root file system and its entrypoint runs chrooted into
# it (with /proc mounted in a private mount namespace), so only what the image holds is used.
#
#   smoke.sh GATEWAY.oci.tar AGENT.oci.tar
#
# Checks: `--version` of both; a hub from the gateway image, as the image's user; a join token
# from it; an agent from the agent image enrols and connects (`--hooks none`: no Flannel here);
# the hub's status lists it; the hub's /metrics carries petrel_build_info. Prints each image's
# size. Where Debian's `umoci` and `skopeo` are installed (CI installs them) the OCI tools read
# the archives: `skopeo inspect` checks each one, `umoci unpack` makes the root file systems;
# otherwise this script's own reader does. Needs root (chroot, unshare), util-linux, GNU tar,
# gzip. Cleans up on any exit.
set -euo pipefail

die() {
  printf 'smoke.sh: FAILED: %s\n' "$*" >&2
  exit 1
}
[[ $# -eq 2 ]] || {
  printf 'usage: smoke.sh GATEWAY.oci.tar AGENT.oci.tar\n' >&2
  exit 64
}
[[ $(id -u) -eq 0 ]] || die "needs root (chroot)"
gw_tar=$(realpath -- "$1")
agent_tar=$(realpath -- "$2")

work=$(mktemp -d /tmp/petrel-smoke.XXXXXX)
pids=()
# A background job is a subshell whose child (unshare, exec'd into chroot, exec'd into the
# binary) is the process to stop: killing the subshell alone left the hub and the agent running.
kill_tree() {
  local p=$1 c
  for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do kill_tree "$c"; done
  kill "$p" 2>/dev/null || true
}
cleanup() {
  for p in "${pids[@]}"; do kill_tree "$p"; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf -- "$work"
}
trap cleanup EXIT

# unpack TAR DIR: the image's root file system (its single layer) into DIR; prints the user.
unpack() {
  local tar=$1 dir=$2 oci=$work/oci.$RANDOM manifest layer config tag bundle
  mkdir -p "$oci"
  tar -xf "$tar" -C "$oci"
  if command -v umoci >/dev/null; then
    tag=$(grep -o '"org.opencontainers.image.ref.name":"[^"]*"' "$oci/index.json" | cut -d '"' -f 4)
    bundle=$work/bundle.$RANDOM
    umoci --log error unpack --image "$oci:$tag" "$bundle" >/dev/null ||
      die "$tar: umoci cannot unpack it"
    mv "$bundle/rootfs" "$dir"
    rm -rf -- "$bundle"
    printf 'smoke.sh: %s: unpacked by umoci\n' "$(basename -- "$tar")" >&2
  fi
  mkdir -p "$dir"
  manifest=$(grep -o '"digest":"sha256:[0-9a-f]*"' "$oci/index.json" | head -n 1 | cut -d : -f 3 | tr -d '"')
  [[ -n $manifest ]] || die "$tar: no manifest in index.json"
  config=$(grep -o '"digest":"sha256:[0-9a-f]*"' "$oci/blobs/sha256/$manifest" | sed -n 1p | cut -d : -f 3 | tr -d '"')
  layer=$(grep -o '"digest":"sha256:[0-9a-f]*"' "$oci/blobs/sha256/$manifest" | sed -n 2p | cut -d : -f 3 | tr -d '"')
  [[ $(sha256sum "$oci/blobs/sha256/$layer" | cut -d ' ' -f 1) == "$layer" ]] || die "$tar: layer digest mismatch"
  if [[ ! -e $dir/usr/local/bin ]]; then
    tar -xzf "$oci/blobs/sha256/$layer" -C "$dir"
  fi
  grep -o '"User":"[0-9:]*"' "$oci/blobs/sha256/$config" | cut -d '"' -f 4
  rm -rf -- "$oci"
}

# in_image ROOT USER CMD...: CMD chrooted into ROOT as USER, /proc mounted privately.
in_image() {
  local root=$1 user=$2
  shift 2
  # The inner script's variables are the inner shell's own (single quotes on purpose).
  # shellcheck disable=SC2016
  unshare --mount --propagation private -- sh -c '
    root=$1; user=$2; shift 2
    mount -t proc proc "$root/proc"
    exec chroot --userspec="$user" "$root" "$@"' sh "$root" "$user" "$@"
}

# A port below the kernel's ephemeral range (32768 and up by default) that no socket uses: an
# ephemeral port can be taken by any other process's outgoing connection between this check
# and the bind (a CI run once lost the agent's admin port that way).
free_port() {
  local p lo
  lo=$(cut -f 1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  while :; do
    p=$((20000 + RANDOM % (lo > 21000 ? lo - 20000 : 12000)))
    if ! ss -Hantu "( sport = :$p )" 2>/dev/null | grep -q .; then
      printf '%s' "$p"
      return
    fi
  done
}

for t in "$gw_tar" "$agent_tar"; do
  printf 'smoke.sh: %s: %s bytes (%s)\n' "$(basename -- "$t")" "$(stat -c %s "$t")" "$(du -h -- "$t" | cut -f 1)"
  if command -v skopeo >/dev/null; then
    # skopeo reads the archive the way a push to a registry would.
    ref=$(tar -xOf "$t" index.json | grep -o '"org.opencontainers.image.ref.name":"[^"]*"' | cut -d '"' -f 4)
    info=$(skopeo inspect "oci-archive:$t:$ref") || die "skopeo cannot read $t"
    grep -q '"org.opencontainers.image.version"' <<<"$info" || die "$t: no version label: $info"
    printf 'smoke.sh: %s: skopeo inspect: %s\n' "$(basename -- "$t")" \
      "$(grep -o '"Digest": "[^"]*"' <<<"$info" | head -n 1)"
  fi
done
gw=$work/gateway
agent=$work/agent
gw_user=$(unpack "$gw_tar" "$gw")
agent_user=$(unpack "$agent_tar" "$agent")
printf 'smoke.sh: gateway image user %s, agent image user %s\n' "$gw_user" "$agent_user"

v=$(in_image "$gw" "$gw_user" /usr/local/bin/petrel-gateway --version) || die "petrel-gateway --version in its image"
[[ $v == petrel-gateway* ]] || die "gateway image says: $v"
v2=$(in_image "$agent" "$agent_user" /usr/local/bin/petrel-edge-agent --version) || die "petrel-edge-agent --version in its image"
[[ $v2 == petrel-edge-agent* ]] || die "agent image says: $v2"
printf 'smoke.sh: %s / %s\n' "$v" "$v2"

port=$(free_port)
admin=$(free_port)
agent_admin=$(free_port)
in_image "$gw" "$gw_user" /usr/local/bin/petrel-gateway run --listen "127.0.0.1:$port" \
  --admin-addr "127.0.0.1:$admin" --relay-listen off --state-dir /tmp/hub \
  >"$work/hub.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do
  grep -q 'hub listening' "$work/hub.log" && break
  sleep 0.2
done
grep -q 'hub listening' "$work/hub.log" || die "hub from the gateway image did not start: $(cat "$work/hub.log")"

created=$(in_image "$gw" "$gw_user" /usr/local/bin/petrel-gateway token create --node edge-a1 \
  --state-dir /tmp/hub --server "127.0.0.1:$port" 2>"$work/token.err") ||
  die "token create in the gateway image: $(cat "$work/token.err")"
# As an operator does: the token into the environment (never on a command line), then the join.
join=$(grep '^petrel-edge-agent join' <<<"$created") || die "no join command in: $created"
token=$(sed -n 's/^export PETREL_JOIN_TOKEN=//p' <<<"$created")
[[ -n $token ]] || die "no export PETREL_JOIN_TOKEN line in: $created"
read -r -a join_args <<<"${join#petrel-edge-agent }"
PETREL_JOIN_TOKEN=$token in_image "$agent" "$agent_user" /usr/local/bin/petrel-edge-agent "${join_args[@]}" \
  --state-dir /var/lib/petrel/agent >"$work/join.log" 2>&1 || die "join from the agent image: $(cat "$work/join.log")"
in_image "$agent" "$agent_user" /usr/local/bin/petrel-edge-agent run --state-dir /var/lib/petrel/agent \
  --hooks none --admin-addr "127.0.0.1:$agent_admin" >"$work/agent.log" 2>&1 &
pids+=($!)
ok=0
for _ in $(seq 50); do
  if in_image "$gw" "$gw_user" /usr/local/bin/petrel-gateway status --admin-addr "127.0.0.1:$admin" 2>/dev/null | grep -q '^edge-a1 '; then
    ok=1
    break
  fi
  sleep 0.2
done
((ok)) || die "the agent from the agent image did not connect: $(tail -n 20 "$work/agent.log")"
in_image "$gw" "$gw_user" /usr/local/bin/petrel-gateway status --admin-addr "127.0.0.1:$admin"
in_image "$agent" "$agent_user" /usr/local/bin/petrel-edge-agent status --admin-addr "127.0.0.1:$agent_admin"
# The hub's metrics, read from the host: build_info names the binary and its version.
exec 3<>"/dev/tcp/127.0.0.1/$admin"
printf 'GET /metrics HTTP/1.0\r\nHost: smoke\r\n\r\n' >&3
metrics=$(cat <&3)
exec 3<&-
grep -q "^petrel_build_info{binary=\"petrel-gateway\",version=\"${v#petrel-gateway }\"" <<<"$metrics" ||
  die "no petrel_build_info in the hub's /metrics"
printf 'smoke.sh: OK: both images run from their own root file systems; the agent enrolled and connected\n'
