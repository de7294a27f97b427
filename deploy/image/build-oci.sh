#!/usr/bin/env bash
# Builds an OCI image archive for one Petrel binary, offline and without a base image: one layer
# holding the binary, exactly the shared libraries `ldd` says it loads (glibc, libgcc_s, libm
# and the dynamic loader, copied from this build host), /etc/passwd and /etc/group with root and
# `nonroot` (65532), and empty /tmp, /proc, /sys, /dev, /run, /var/lib/petrel.
#
#   build-oci.sh --binary PATH --name NAME --tag TAG --out FILE.oci.tar [--user UID:GID]
#                [--revision REV] [--source URL]
#
# The archive is an OCI image layout (oci-layout, index.json, blobs/sha256/...) with a
# Docker-compatible manifest.json beside it, so all of these load it:
#   ctr -n k8s.io images import FILE.oci.tar             # containerd (the name comes along)
#   skopeo copy oci-archive:FILE.oci.tar docker://REGISTRY/NAME:TAG
#   docker load -i FILE.oci.tar
# The output is reproducible: fixed timestamps (SOURCE_DATE_EPOCH, default 0), sorted entries,
# numeric owners, gzip without a name or time.
#
# Needs: bash, coreutils, tar (GNU), gzip, ldd (libc-bin); strip (binutils) if present. Exit status: 0 built, 1 failed,
# 64 bad arguments.
set -euo pipefail
umask 022

die() {
  printf 'build-oci.sh: error: %s\n' "$*" >&2
  exit 1
}
usage() {
  printf 'build-oci.sh: %s\n' "$*" >&2
  exit 64
}

binary='' name='' tag='' out='' user=0:0 revision='' source=''
while [[ $# -gt 0 ]]; do
  case $1 in
  --binary | --name | --tag | --out | --user | --revision | --source)
    [[ $# -ge 2 ]] || usage "$1 needs a value"
    case $1 in
    --binary) binary=$2 ;;
    --name) name=$2 ;;
    --tag) tag=$2 ;;
    --out) out=$2 ;;
    --user) user=$2 ;;
    --revision) revision=$2 ;;
    --source) source=$2 ;;
    esac
    shift 2
    ;;
  *) usage "unknown argument: $1" ;;
  esac
done
[[ -n $binary && -n $name && -n $tag && -n $out ]] || usage "--binary, --name, --tag and --out are required"
[[ -f $binary && -x $binary ]] || die "--binary $binary: not an executable file"
[[ $user =~ ^[0-9]+:[0-9]+$ ]] || usage "--user $user: expected UID:GID"
[[ $tag =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || usage "--tag $tag: not a valid tag"

epoch=${SOURCE_DATE_EPOCH:-0}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
case $(uname -m) in
x86_64) arch=amd64 ;;
aarch64) arch=arm64 ;;
armv7l) arch=arm ;;
*) arch=$(uname -m) ;;
esac
bin_name=$(basename -- "$binary")
version=$("$binary" --version 2>/dev/null | awk '{print $2}') || die "$binary --version failed"

work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT
root=$work/rootfs
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/proc" "$root/sys" "$root/dev" "$root/run" \
  "$root/var/lib/petrel" "$root/tmp"
chmod 1777 "$root/tmp"
cp -- "$binary" "$root/usr/local/bin/$bin_name"
chmod 0755 "$root/usr/local/bin/$bin_name"
# Release builds keep line tables for profiling (debug = 1); the image does not need them.
if command -v strip >/dev/null; then
  strip --strip-debug -- "$root/usr/local/bin/$bin_name"
else
  printf 'build-oci.sh: strip (binutils) not found: the binary keeps its debug sections\n' >&2
fi

# Exactly the shared objects the binary loads, at the paths it looks for them (the loader at
# its PT_INTERP path). Real files, not links: the image has no other /lib.
libs=$(ldd -- "$binary" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
[[ -n $libs ]] || die "ldd found no libraries for $binary (a static binary needs none; remove this check)"
for lib in $libs; do
  mkdir -p "$root$(dirname -- "$lib")"
  cp -L -- "$lib" "$root$lib"
  chmod 0755 "$root$lib"
done

printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/tmp:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
chmod 0644 "$root/etc/passwd" "$root/etc/group" "$root/etc/nsswitch.conf"

layout=$work/layout
mkdir -p "$layout/blobs/sha256"
find "$root" -exec touch -h -d "@$epoch" {} +
(cd "$root" && tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner \
  --format=gnu -cf "$work/layer.tar" -- *)
diff_id=$(sha256sum "$work/layer.tar" | cut -d ' ' -f 1)
gzip -n -9 <"$work/layer.tar" >"$work/layer.tar.gz"
layer_digest=$(sha256sum "$work/layer.tar.gz" | cut -d ' ' -f 1)
layer_size=$(stat -c %s "$work/layer.tar.gz")
mv "$work/layer.tar.gz" "$layout/blobs/sha256/$layer_digest"

# put_blob TEXT: stores TEXT as a blob; sets blob_digest and blob_size.
put_blob() {
  printf '%s' "$1" >"$work/blob"
  blob_digest=$(sha256sum "$work/blob" | cut -d ' ' -f 1)
  blob_size=$(stat -c %s "$work/blob")
  mv "$work/blob" "$layout/blobs/sha256/$blob_digest"
}

labels="\"org.opencontainers.image.title\":\"$bin_name\",\"org.opencontainers.image.version\":\"$version\",\"org.opencontainers.image.revision\":\"$revision\",\"org.opencontainers.image.source\":\"$source\",\"org.opencontainers.image.created\":\"$created\",\"org.opencontainers.image.licenses\":\"Apache-2.0\""
put_blob "{\"created\":\"$created\",\"architecture\":\"$arch\",\"os\":\"linux\",\"config\":{\"User\":\"$user\",\"Env\":[\"PATH=/usr/local/bin:/usr/bin:/bin\"],\"Entrypoint\":[\"/usr/local/bin/$bin_name\"],\"WorkingDir\":\"/\",\"Labels\":{$labels}},\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$diff_id\"]},\"history\":[{\"created\":\"$created\",\"created_by\":\"deploy/image/build-oci.sh: $bin_name and the shared libraries it loads\"}]}"
config_digest=$blob_digest config_size=$blob_size
put_blob "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$config_digest\",\"size\":$config_size},\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$layer_digest\",\"size\":$layer_size}],\"annotations\":{$labels}}"
manifest_digest=$blob_digest manifest_size=$blob_size
printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"%s","io.containerd.image.name":"%s:%s"}}]}' \
  "$manifest_digest" "$manifest_size" "$tag" "$name" "$tag" >"$layout/index.json"
printf '[{"Config":"blobs/sha256/%s","RepoTags":["%s:%s"],"Layers":["blobs/sha256/%s"]}]' \
  "$config_digest" "$name" "$tag" "$layer_digest" >"$layout/manifest.json"

mkdir -p "$(dirname -- "$out")"
find "$layout" -exec touch -h -d "@$epoch" {} +
(cd "$layout" && tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner \
  --format=gnu -cf "$work/image.tar" -- oci-layout index.json manifest.json blobs)
mv "$work/image.tar" "$out"
printf 'build-oci.sh: %s:%s (%s, %s) -> %s: %s bytes (layer %s bytes gzipped, %s bytes unpacked), manifest sha256:%s\n' \
  "$name" "$tag" "$arch" "$user" "$out" "$(stat -c %s "$out")" "$layer_size" "$(stat -c %s "$work/layer.tar")" "$manifest_digest"
