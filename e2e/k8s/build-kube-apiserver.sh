#!/usr/bin/env bash
# Build kube-apiserver v1.20.2 from Debian bookworm's `kubernetes` source package, and take etcd
# (and a matching kubectl) from Debian's binary packages, once, into a per-user cache:
#
#   ${PETREL_K8S_CACHE:-$HOME/.cache/petrel-k8s}/bin/{kube-apiserver,etcd,kubectl}
#
# Prints the kube-apiserver path on stdout; progress goes to stderr, the full log to
# $CACHE/build.log. When the cache is complete it prints the path at once.
#
# Why this way: Petrel's e2e tests need a real apiserver, and the only place our machines and CI
# can fetch from is the Debian archive (no dl.k8s.io, no Go module proxy). Bookworm ships the
# kubernetes 1.20.2 sources (with vendor/) but no kube-apiserver binary, so we compile it with
# Debian's Go 1.19. Everything is fetched with the ordinary apt client.
#
# Requirements: Debian bookworm apt sources (deb.debian.org or a mirror). Root only if rsync, make
# or dpkg-dev are missing: they are then installed with apt-get (the only change made to the
# system). The system's apt lists/cache are not touched: apt runs with a private sources list,
# lists directory and archive cache inside the work dir.
#
# Env:
#   PETREL_K8S_CACHE           cache dir (default $HOME/.cache/petrel-k8s)
#   PETREL_K8S_KEEP_WORK=1     keep the ~1.5 GB work dir (for debugging a failed build)
#   PETREL_K8S_APT_SOURCES     a deb822 .sources file to use instead of the system's Debian one
#   PETREL_K8S_KUBE_DEB_VERSION  Debian version of the `kubernetes` source package to build
set -euo pipefail

CACHE=${PETREL_K8S_CACHE:-$HOME/.cache/petrel-k8s}
BIN=$CACHE/bin
LOG=$CACHE/build.log
# The version proven to build and run. If the archive drops it (a newer +deb12uN security
# upload), we fall back to the archive's candidate as long as it is still upstream 1.20.2.
KUBE_DEB_VERSION=${PETREL_K8S_KUBE_DEB_VERSION:-1.20.5+really1.20.2-1.1+deb12u1}
KUBE_UPSTREAM=1.20.2
# Bump when the recipe changes so that stale caches are rebuilt.
STAMP_CONTENT="recipe=1 kubernetes=$KUBE_UPSTREAM"

log() { printf '[build-kube-apiserver] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
built() {
  [[ -x $BIN/kube-apiserver && -x $BIN/etcd && -x $BIN/kubectl && -f $BIN/.stamp ]] &&
    [[ $(<"$BIN/.stamp") == "$STAMP_CONTENT" ]]
}

# Fast path, without taking the lock.
if built; then echo "$BIN/kube-apiserver"; exit 0; fi

mkdir -p "$BIN"
# Serialise concurrent callers (parallel test runs); whoever waited finds the cache ready.
exec 9>"$CACHE/.build.lock"
flock 9
if built; then echo "$BIN/kube-apiserver"; exit 0; fi

# We hold the lock, so any work dir left behind is from a run that was killed: remove it.
# (Go's module cache files are read-only, hence the chmod.)
rm_tree() { chmod -R u+w "$1" 2>/dev/null || true; rm -rf "$1"; }
for old in "$CACHE"/work.*; do [[ -e $old ]] && rm_tree "$old"; done

# The work dir lives inside the cache so the final `mv` into bin/ is an atomic rename.
W=$(mktemp -d "$CACHE/work.XXXXXX")
cleanup() {
  if [[ ${PETREL_K8S_KEEP_WORK:-0} == 1 ]]; then log "work dir kept: $W"; else rm_tree "$W"; fi
}
trap cleanup EXIT
# Long steps run in their own process group (setsid) in the background while we `wait`: a
# SIGTERM/SIGINT then reaches our trap at once (bash would otherwise defer it until `make`
# finished), and the trap stops the whole step (make and every compiler under it) before the
# work dir is removed.
CHILD=
on_signal() {
  if [[ -n $CHILD ]]; then
    kill -TERM -- "-$CHILD" 2>/dev/null || true
    wait "$CHILD" 2>/dev/null || true
  fi
  log "interrupted"
  exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
mkdir -p "$W"/apt/etc/sources.list.d "$W"/apt/lists/partial "$W"/apt/cache/archives/partial \
  "$W"/debs "$W"/src "$W"/x "$W"/stage
: >"$LOG"
START=$SECONDS

# spawn DIR CMD...: run CMD in DIR with its output appended to $LOG; returns CMD's status. fd 9
# (the lock) is closed for it, so a stray process of a killed build cannot hold the lock.
spawn() {
  local dir=$1 rc=0
  shift
  (cd "$dir" && exec setsid "$@") </dev/null >>"$LOG" 2>&1 9>&- &
  CHILD=$!
  wait "$CHILD" || rc=$?
  CHILD=
  return "$rc"
}
# run DIR CMD...: spawn, and on failure show the log tail and stop.
run() {
  if ! spawn "$@"; then
    tail -n 40 "$LOG" >&2
    shift
    die "failed: $* (full log: $LOG)"
  fi
}

# --- 1. Private apt configuration: the system's Debian sources, with deb-src added. ----------
: >"$W/apt/etc/sources.list"
SYS_SOURCES=${PETREL_K8S_APT_SOURCES:-/etc/apt/sources.list.d/debian.sources}
if [[ -f $SYS_SOURCES ]]; then
  # deb822: "Types: deb" -> "Types: deb deb-src".
  sed -E 's/^Types:[[:space:]]*deb[[:space:]]*$/Types: deb deb-src/' "$SYS_SOURCES" \
    >"$W/apt/etc/sources.list.d/debian.sources"
elif grep -qE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list 2>/dev/null; then
  # One-line format: keep each deb line and add its deb-src twin.
  grep -E '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list |
    sed -E 'p;s/^([[:space:]]*)deb([[:space:]])/\1deb-src\2/' >"$W/apt/etc/sources.list"
else
  die "no Debian apt sources found (set PETREL_K8S_APT_SOURCES=FILE.sources)"
fi
APT=(-o "Dir::Etc::SourceList=$W/apt/etc/sources.list"
  -o "Dir::Etc::SourceParts=$W/apt/etc/sources.list.d"
  -o "Dir::State::Lists=$W/apt/lists"
  -o "Dir::Cache=$W/apt/cache"
  -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=")
# As root apt downloads as user _apt, which cannot enter a private dir under /root: download
# as root instead of printing a warning per file.
if [[ $(id -u) -eq 0 ]]; then APT+=(-o APT::Sandbox::User=root); fi
log "apt-get update (private lists in $W/apt; log: $LOG)"
run "$W" apt-get "${APT[@]}" update

# --- 2. Build tools: apt-get source needs dpkg-source; kube's Makefile needs make and rsync. ---
missing=()
command -v dpkg-source >/dev/null || missing+=(dpkg-dev)
command -v make >/dev/null || missing+=(make)
command -v rsync >/dev/null || missing+=(rsync)
if ((${#missing[@]})); then
  [[ $(id -u) -eq 0 ]] || die "missing build tools; run as root or: apt-get install ${missing[*]}"
  log "apt-get install ${missing[*]}"
  run "$W" env DEBIAN_FRONTEND=noninteractive apt-get "${APT[@]}" install -y -q --no-install-recommends \
    "${missing[@]}"
fi

# --- 3. Downloads. -----------------------------------------------------------------------------
log "apt-get source kubernetes=$KUBE_DEB_VERSION"
if ! spawn "$W/src" apt-get "${APT[@]}" source "kubernetes=$KUBE_DEB_VERSION"; then
  log "kubernetes=$KUBE_DEB_VERSION unavailable; trying the archive's candidate"
  rm_tree "$W/src" && mkdir -p "$W/src"
  run "$W/src" apt-get "${APT[@]}" source kubernetes
fi
K=$(find "$W/src" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n 1)
[[ -n $K && -d $K/vendor ]] || die "kubernetes source tree not found under $W/src"
[[ $K == *"really$KUBE_UPSTREAM" || $K == *"-$KUBE_UPSTREAM" ]] ||
  die "source is $(basename "$K"), not upstream $KUBE_UPSTREAM (pin PETREL_K8S_KUBE_DEB_VERSION)"

# Go 1.19 (unpacked, not installed: the system keeps whatever Go it has), reflect2 1.0.2, etcd
# (unpacked, not installed: installing etcd-server would start a system etcd service), and
# kubectl 1.20.2 from kubernetes-client (version-matched to the apiserver).
DEBS=(golang-1.19-go golang-1.19-src golang-github-modern-go-reflect2-dev etcd-server kubernetes-client)
log "apt-get download ${DEBS[*]}"
run "$W/debs" apt-get "${APT[@]}" download "${DEBS[@]}"
for p in "${DEBS[@]}"; do run "$W" dpkg-deb -x "$W/debs/${p}_"*.deb "$W/x"; done

# --- 4. The one source fix. ----------------------------------------------------------------
# Vendored modern-go/reflect2 1.0.1 relies on runtime internals that changed in Go 1.18: the
# apiserver then crashes in json-iterator. Debian's reflect2 1.0.2 (same API) fixes it.
R2=$K/vendor/github.com/modern-go/reflect2
rm -rf "$R2"
cp -a "$W/x/usr/share/gocode/src/github.com/modern-go/reflect2" "$R2"
rm -f "$R2"/go.mod "$R2"/go.sum "$R2"/*_test.go

# The tarball is not a git checkout: give kube's version script the version explicitly, or it
# would report v0.0.0 (or pick up an enclosing git repo if the cache sits inside one).
minor=${KUBE_UPSTREAM#*.}
cat >"$W/version.env" <<VEOF
KUBE_GIT_VERSION='v$KUBE_UPSTREAM'
KUBE_GIT_MAJOR='${KUBE_UPSTREAM%%.*}'
KUBE_GIT_MINOR='${minor%%.*}'
KUBE_GIT_TREE_STATE='clean'
VEOF

# --- 5. Build with kube's own Makefile (GOPATH mode, runs its code generators), offline. -------
GOROOT_DIR=$(find "$W/x/usr/lib" -mindepth 1 -maxdepth 1 -type d -name 'go-1.19' | head -n 1)
[[ -n $GOROOT_DIR && -x $GOROOT_DIR/bin/go ]] || die "Go 1.19 not found under $W/x/usr/lib"
# A clean Go environment: nothing from the caller's Go setup may leak in, and nothing may be
# fetched (GOPROXY=off; GOTOOLCHAIN=local stops a newer go from trying to switch toolchains).
unset GOPATH GOFLAGS GOOS GOARCH GOBIN GO111MODULE GOWORK GOENV GOROOT
export GOROOT=$GOROOT_DIR PATH=$GOROOT_DIR/bin:$PATH CGO_ENABLED=0 GOPROXY=off GOTOOLCHAIN=local \
  GOCACHE=$W/gocache KUBE_GIT_VERSION_FILE=$W/version.env
log "make WHAT=cmd/kube-apiserver with $(go version) (several minutes on 2 cores)"
# providerless: leave out the cloud-provider SDKs (smaller, faster); -s -w: strip symbols.
run "$K" env HOME="$W" make WHAT=cmd/kube-apiserver GOFLAGS=-tags=providerless GOLDFLAGS='-s -w'
OUT=$(find "$K/_output/local/bin" -type f -name kube-apiserver | head -n 1)
[[ -n $OUT && -x $OUT ]] || die "the build produced no kube-apiserver"

# --- 6. Install into the cache: stage, smoke-test, then rename (atomic per file). The stamp is
# written last, so a run killed half-way leaves a cache that `built` rejects and rebuilds.
install -m 0755 "$OUT" "$W/stage/kube-apiserver"
install -m 0755 "$W/x/usr/bin/etcd" "$W/stage/etcd"
install -m 0755 "$W/x/usr/bin/kubectl" "$W/stage/kubectl"
v_api=$("$W/stage/kube-apiserver" --version) || die "built kube-apiserver does not run"
v_etcd=$("$W/stage/etcd" --version | head -n 1) || die "etcd does not run"
v_ctl=$("$W/stage/kubectl" version --client --short 2>/dev/null) || die "kubectl does not run"
rm -f "$BIN/.stamp"
for b in kube-apiserver etcd kubectl; do mv -f "$W/stage/$b" "$BIN/$b"; done
printf '%s\n' "$STAMP_CONTENT" >"$BIN/.stamp.tmp" && mv -f "$BIN/.stamp.tmp" "$BIN/.stamp"
log "$v_api; $v_etcd; kubectl $v_ctl"
log "built in $((SECONDS - START)) s"
echo "$BIN/kube-apiserver"
