#!/usr/bin/env bash
# Install, enrol and start the Petrel edge agent on an edge device, or remove it again.
#
#   install.sh --binary PATH --server HOST:PORT --token TOKEN --ca-sha256 FP [--node-name NAME]
#              [--server HOST:PORT ...] [--hooks auto|fast|portable|none] [--admin-addr IP:PORT]
#              [--unit FILE] [--rejoin] [--root DIR]
#   install.sh --binary PATH [options]          # upgrade an enrolled device: no token needed
#   install.sh --uninstall [--purge] [--root DIR]
#
# Install (idempotent: a second run with the same arguments changes nothing and joins nothing):
#   1. runs `petrel-edge-agent join` with the LOCAL binary PATH (it downloads nothing); the
#      identity goes to /var/lib/petrel/agent (0700, files 0600). A device already enrolled as
#      NAME under the CA --ca-sha256 pins is left as it is (the token is not used again); one
#      enrolled otherwise is refused unless --rejoin (a new token, e.g. after a CA rotation). A
#      refused join installs nothing;
#   2. copies the binary to /usr/local/bin/petrel-edge-agent;
#   3. writes /etc/petrel/agent.toml (keys = `petrel-edge-agent run` long flags);
#   4. installs the systemd unit (petrel-edge-agent.service next to this script, or --unit);
#   5. enables and (re)starts the unit; without a running systemd, or with --root, it only
#      enables it (the multi-user.target.wants symlink) and starts nothing.
#   The first --server is the one `join` dials; all of them go to the config. The token may also
#   come from the environment (PETREL_JOIN_TOKEN), which keeps it out of `ps`.
#
# Upgrade (a device already enrolled, i.e. /var/lib/petrel/agent holds node.pem and ca.crt):
#   --token and --ca-sha256 are not needed (and without --rejoin not used). Every setting not
#   given again is kept from the existing /etc/petrel/agent.toml: the servers, the node name,
#   --hooks and --admin-addr; the script says what it kept and what it changed. Giving --server
#   replaces the configured list, and the script names the servers it dropped. A --node-name
#   other than the one the device is enrolled as is refused (that needs --rejoin and a token).
#
# Uninstall: stops and disables the unit, runs `petrel-edge-agent cleanup` (removes the routes,
# rules and devices the agent added), removes the binary, the config and the unit. The identity
# stays unless --purge is given.
#
# --root DIR prefixes every path this script writes or removes (a staging directory, tests); it
# never touches systemd or the kernel then (no systemctl, no cleanup).
#
# Exit status: 0 done, 1 failed, 64 bad arguments.
set -euo pipefail
umask 022

readonly BIN_PATH=/usr/local/bin/petrel-edge-agent
readonly CONF_DIR=/etc/petrel
readonly CONF_PATH=/etc/petrel/agent.toml
readonly UNIT_NAME=petrel-edge-agent.service
readonly UNIT_PATH=/etc/systemd/system/petrel-edge-agent.service
readonly WANTS_DIR=/etc/systemd/system/multi-user.target.wants
readonly STATE_PARENT=/var/lib/petrel
readonly STATE_DIR=/var/lib/petrel/agent
readonly RUN_DIR=/run/petrel
readonly DEFAULT_ADMIN=127.0.0.1:9471

log() { printf 'install.sh: %s\n' "$*"; }
die() {
  printf 'install.sh: error: %s\n' "$*" >&2
  exit 1
}
usage() {
  printf 'install.sh: %s (see --help)\n' "$*" >&2
  exit 64
}
help() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  exit 0
}

binary=
servers=()
token=${PETREL_JOIN_TOKEN:-}
ca_sha256=
node_name=
hooks=
admin_addr=$DEFAULT_ADMIN
hooks_given=0
admin_given=0
unit_src=
rejoin=0
uninstall=0
purge=0
root=

# One option's value: "--opt VALUE" or "--opt=VALUE".
need_value() { [[ $# -ge 2 && -n $2 ]] || usage "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  opt=$1
  val=
  shift
  case $opt in
  --*=*)
    val=${opt#*=}
    opt=${opt%%=*}
    set -- "$val" "$@"
    ;;
  esac
  case $opt in
  --binary | --server | --token | --ca-sha256 | --node-name | --hooks | --admin-addr | --unit | --root)
    need_value "$opt" "$@"
    val=$1
    shift
    ;;
  esac
  case $opt in
  --binary) binary=$val ;;
  --server) servers+=("$val") ;;
  --token) token=$val ;;
  --ca-sha256) ca_sha256=$val ;;
  --node-name) node_name=$val ;;
  --hooks)
    hooks=$val
    hooks_given=1
    ;;
  --admin-addr)
    admin_addr=$val
    admin_given=1
    ;;
  --unit) unit_src=$val ;;
  --root) root=$val ;;
  --rejoin) rejoin=1 ;;
  --uninstall) uninstall=1 ;;
  --purge) purge=1 ;;
  -h | --help) help ;;
  *) usage "unknown argument: $opt" ;;
  esac
done

# R prefixes every path we write; empty for the real system.
R=
if [[ -n $root ]]; then
  mkdir -p -- "$root"
  R=$(cd -- "$root" && pwd -P)
  [[ $R == / ]] && R=
fi
if [[ -z $R && $(id -u) -ne 0 ]]; then
  die "run as root (or give --root DIR to stage the files in a directory)"
fi

# systemd is ours to drive only on the real system, and only if it is running.
systemd_live() { [[ -z $R && -d /run/systemd/system ]] && command -v systemctl >/dev/null; }

# Removes empty directories from DIR upwards, never R itself or anything above it. Only under
# --root: on the real system /usr/local/bin or /etc/systemd/system are not ours to remove.
prune_up() {
  local d=$1
  [[ -n $R ]] || return 0
  while [[ $d == "$R"/* ]]; do
    if [[ -d $d ]]; then rmdir -- "$d" 2>/dev/null || return 0; fi
    d=$(dirname -- "$d")
  done
}

remove_file() { # PATH WHAT
  if [[ -e $1 || -L $1 ]]; then
    rm -f -- "$1"
    log "removed $2 $1"
  fi
}

do_uninstall() {
  if systemd_live; then
    if systemctl cat "$UNIT_NAME" >/dev/null 2>&1; then
      systemctl disable --now "$UNIT_NAME" || log "warning: could not stop/disable $UNIT_NAME"
      log "stopped and disabled $UNIT_NAME"
    fi
  fi
  if [[ -n $R ]]; then
    log "--root: not running petrel-edge-agent cleanup (the kernel's state is not under --root)"
  elif [[ -x $BIN_PATH ]]; then
    local with_config=()
    [[ -f $CONF_PATH ]] && with_config=(--config "$CONF_PATH")
    if "$BIN_PATH" ${with_config[@]+"${with_config[@]}"} cleanup; then
      log "removed the agent's routes, rules and devices"
    else
      log "warning: petrel-edge-agent cleanup failed; run it again by hand before removing the binary"
    fi
  fi
  remove_file "$R$WANTS_DIR/$UNIT_NAME" "the enablement symlink"
  remove_file "$R$UNIT_PATH" "the unit"
  if systemd_live; then
    systemctl daemon-reload
    systemctl reset-failed "$UNIT_NAME" 2>/dev/null || true
  fi
  remove_file "$R$CONF_PATH" "the config"
  rmdir -- "$R$CONF_DIR" 2>/dev/null || true
  remove_file "$R$BIN_PATH" "the binary"
  # The unit's runtime directory (kept across stops for cleanup); empty after cleanup.
  rmdir -- "$R$RUN_DIR" 2>/dev/null || true
  if ((purge)); then
    if [[ -e $R$STATE_DIR ]]; then
      rm -rf -- "$R$STATE_DIR"
      log "removed the identity $R$STATE_DIR"
    fi
    rmdir -- "$R$STATE_PARENT" 2>/dev/null || true
  elif [[ -e $R$STATE_DIR ]]; then
    log "kept the identity in $R$STATE_DIR (--purge removes it)"
  fi
  prune_up "$R$WANTS_DIR"
  prune_up "$(dirname -- "$R$UNIT_PATH")"
  prune_up "$(dirname -- "$R$BIN_PATH")"
  prune_up "$R$CONF_DIR"
  prune_up "$R$STATE_PARENT"
  prune_up "$R$RUN_DIR"
  log "uninstalled"
}

if ((uninstall)); then
  do_uninstall
  exit 0
fi
((purge)) && usage "--purge goes with --uninstall"

# ---- install: check everything before writing anything -------------------------------------
enrolled=0
[[ -f $R$STATE_DIR/node.pem && -f $R$STATE_DIR/ca.crt ]] && enrolled=1
upgrade=0
((enrolled && !rejoin)) && [[ -z $token ]] && upgrade=1

# The settings of an earlier install (the config this script wrote): kept unless given again.
conf_value() { # KEY: the quoted value of `KEY = "..."` in the existing config, unquoted
  [[ -f $R$CONF_PATH ]] || return 0
  sed -n "s/^$1 = \"\(.*\)\"\$/\1/p" -- "$R$CONF_PATH" | head -n 1
}
old_servers=()
if [[ -f $R$CONF_PATH ]]; then
  line=$(sed -n 's/^servers = \[\(.*\)\]$/\1/p' -- "$R$CONF_PATH" | head -n 1)
  while [[ $line =~ \"([^\"]*)\" ]]; do
    old_servers+=("${BASH_REMATCH[1]}")
    line=${line#*\""${BASH_REMATCH[1]}"\"}
  done
fi
old_node=$(conf_value node-name)
old_hooks=$(conf_value hooks)
old_admin=$(conf_value admin-addr)
if [[ ${#servers[@]} -eq 0 && ${#old_servers[@]} -gt 0 ]]; then
  servers=("${old_servers[@]}")
  log "servers: keeping the configured ${servers[*]} (--server replaces them)"
elif [[ ${#old_servers[@]} -gt 0 ]]; then
  dropped=()
  for o in "${old_servers[@]}"; do
    keep=0
    for s in "${servers[@]}"; do [[ $s == "$o" ]] && keep=1; done
    ((keep)) || dropped+=("$o")
  done
  if [[ ${#dropped[@]} -gt 0 ]]; then
    log "servers: now ${servers[*]}; dropping the configured ${dropped[*]} (give it with --server to keep it)"
  fi
fi
if [[ -z $node_name && -n $old_node ]]; then
  node_name=$old_node
  log "node name: keeping the configured $node_name"
fi
if ! ((hooks_given)) && [[ -n $old_hooks ]]; then
  hooks=$old_hooks
  log "hooks: keeping the configured $hooks"
fi
if ! ((admin_given)) && [[ -n $old_admin ]]; then
  admin_addr=$old_admin
fi

valid_host_port() {
  [[ $1 =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?:[0-9]{1,5}$ || $1 =~ ^\[[0-9A-Fa-f:.]+\]:[0-9]{1,5}$ ]]
}
[[ ${#servers[@]} -gt 0 ]] || usage "--server HOST:PORT is required"
for s in "${servers[@]}"; do
  valid_host_port "$s" || usage "--server $s: expected HOST:PORT, e.g. gw.example.com:7443"
done
if [[ -z $node_name ]]; then
  node_name=$(tr '[:upper:]' '[:lower:]' </proc/sys/kernel/hostname)
  log "node name: $node_name (the host name; --node-name overrides)"
fi
[[ ${#node_name} -le 253 && $node_name =~ ^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$ ]] ||
  usage "--node-name $node_name: a Kubernetes node name (lowercase letters, digits, '-', '.')"
case $hooks in
'' | auto | fast | portable | none) ;;
*) usage "--hooks $hooks: expected auto, fast, portable or none" ;;
esac
[[ $admin_addr =~ ^[0-9.]+:[0-9]{1,5}$ || $admin_addr =~ ^\[[0-9A-Fa-f:.]+\]:[0-9]{1,5}$ ]] ||
  usage "--admin-addr $admin_addr: expected IP:PORT"
if [[ -z $binary ]]; then
  [[ -x $R$BIN_PATH ]] || usage "--binary PATH is required (a local petrel-edge-agent binary)"
  binary=$R$BIN_PATH
fi
[[ -f $binary && -x $binary ]] || die "--binary $binary: not an executable file"
version=$("$binary" --version 2>/dev/null) || die "--binary $binary does not run on this device"
[[ $version == petrel-edge-agent* ]] || die "--binary $binary is not petrel-edge-agent (it says: $version)"
if [[ -z $unit_src ]]; then
  unit_src=$(dirname -- "${BASH_SOURCE[0]}")/$UNIT_NAME
fi
[[ -f $unit_src ]] || die "no unit file at $unit_src (copy $UNIT_NAME next to install.sh, or pass --unit FILE)"
if ((upgrade)); then
  # An enrolled device: `join` below only checks that it is enrolled as this node (it does
  # not dial the hub), against the CA it already pins; the token is never sent anywhere.
  [[ -z $ca_sha256 ]] || log "--ca-sha256 ignored: the device already pins its CA"
  ca_sha256=$(sed -n '/-----BEGIN CERTIFICATE-----/,/-----END CERTIFICATE-----/p' -- "$R$STATE_DIR/ca.crt" |
    sed -e '1d' -e '$d' | base64 -d | sha256sum | cut -d ' ' -f 1) ||
    die "cannot read the CA of this device's identity ($R$STATE_DIR/ca.crt)"
  token=unused-device-already-enrolled
  log "upgrading an enrolled device (no token needed)"
else
  [[ -n $token ]] || usage "--token is required (from \`petrel-gateway token create\`)"
  [[ -n $ca_sha256 ]] || usage "--ca-sha256 is required (from \`petrel-gateway token create\`)"
fi

# ---- install: enrol first, so a refused join leaves nothing half-installed -----------------
# `join` itself refuses a device enrolled as another node (or under another CA), and does
# nothing, without dialling the hub, for one already enrolled as this node under this CA.
changed=0
unit_changed=0
# The parents as systemd's StateDirectory= makes them (0755); join makes the identity's own 0700.
had_state_parent=0
[[ -d $R$STATE_PARENT ]] && had_state_parent=1
mkdir -p -- "$R$STATE_PARENT"
identity() { if [[ -f $R$STATE_DIR/node.pem ]]; then cksum <"$R$STATE_DIR/node.pem"; fi; }
before=$(identity)
join_args=(join --server "${servers[0]}" --node-name "$node_name" --state-dir "$R$STATE_DIR")
((rejoin)) && join_args+=(--force)
if ! PETREL_JOIN_TOKEN=$token PETREL_CA_SHA256=$ca_sha256 "$binary" "${join_args[@]}"; then
  if ((enrolled && !rejoin)); then
    die "join failed; nothing was changed. To enrol this device again (another node name or CA) pass --rejoin with a new token"
  fi
  if ((!had_state_parent)); then
    rmdir -- "$R$STATE_PARENT" 2>/dev/null || true
    prune_up "$(dirname -- "$R$STATE_PARENT")"
  fi
  die "join failed (see the message above); nothing was installed"
fi
[[ $(identity) == "$before" ]] || changed=1

# ---- install: write only what differs ------------------------------------------------------
tmp=
trap '[[ -z $tmp ]] || rm -f -- "$tmp"' EXIT

# place_text TEXT DST MODE WHAT: atomically replaces DST unless it already holds TEXT (plus a
# newline) with MODE. The temporary file lives next to DST, so --root confines it too.
place_text() {
  local text=$1 dst=$2 mode=$3 what=$4
  if [[ -f $dst && $(stat -c %a -- "$dst") == "$mode" ]] &&
    cmp -s -- "$dst" <(printf '%s\n' "$text"); then
    log "$what unchanged: $dst"
    return 1
  fi
  write_new "$dst" "$mode" printf '%s\n' "$text"
  log "installed $what: $dst"
}

# place_file SRC DST MODE WHAT: the same for a file.
place_file() {
  local src=$1 dst=$2 mode=$3 what=$4
  if [[ -f $dst && $(stat -c %a -- "$dst") == "$mode" ]] && cmp -s -- "$src" "$dst"; then
    log "$what unchanged: $dst"
    return 1
  fi
  write_new "$dst" "$mode" cat -- "$src"
  log "installed $what: $dst"
}

# write_new DST MODE COMMAND...: COMMAND's output becomes DST (temporary file, chmod, rename).
write_new() {
  local dst=$1 mode=$2
  shift 2
  mkdir -p -- "$(dirname -- "$dst")"
  tmp=$(mktemp -- "$dst.XXXXXX")
  "$@" >"$tmp"
  chmod -- "$mode" "$tmp"
  mv -f -- "$tmp" "$dst"
  tmp=
  changed=1
}

place_file "$binary" "$R$BIN_PATH" 755 "the binary" || true

servers_toml=
for s in "${servers[@]}"; do
  servers_toml+="${servers_toml:+, }\"$s\""
done
config_text="# Written by install.sh (Petrel edge agent); rerun it to change this file.
# Keys are the long flags of \`petrel-edge-agent run\` (see its --help).
node-name = \"$node_name\"
servers = [$servers_toml]
state-dir = \"$STATE_DIR\"
admin-addr = \"$admin_addr\"${hooks:+
hooks = \"$hooks\"}"
place_text "$config_text" "$R$CONF_PATH" 644 "the config" || true

place_file "$unit_src" "$R$UNIT_PATH" 644 "the unit" && unit_changed=1

# Enable and start.
if systemd_live; then
  ((unit_changed)) && systemctl daemon-reload
  systemctl enable --quiet "$UNIT_NAME"
  if ((changed)); then
    systemctl restart "$UNIT_NAME"
    log "started $UNIT_NAME"
  else
    systemctl start "$UNIT_NAME"
  fi
  log "done; check with: systemctl status $UNIT_NAME; petrel-edge-agent status"
else
  link=$R$WANTS_DIR/$UNIT_NAME
  if [[ $(readlink -- "$link" 2>/dev/null) != "$UNIT_PATH" ]]; then
    mkdir -p -- "$R$WANTS_DIR"
    ln -sfn -- "$UNIT_PATH" "$link"
    log "enabled $UNIT_NAME: $link"
  fi
  if [[ -n $R ]]; then
    log "done (--root $R: enabled, not started)"
  else
    log "done; systemd is not running here: enabled, not started"
  fi
fi
