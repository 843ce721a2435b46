#!/usr/bin/env bash
# Builds the raftkvd image with no registry to pull from. The Dockerfile is FROM scratch:
# this script stages its whole file system under target/image-root (the binary, stripped;
# the shared libraries it loads, found with ldd; a passwd entry for the user it runs as;
# an empty /data, staged apart as target/image-data so that the non-root user owns it),
# then runs `docker build -t TAG .` in the repository root.
#
#   docker/build-image.sh [TAG]          # release build, tagged raftkvd by default
#   BINARY=path docker/build-image.sh T  # stage an already built binary instead
#
# Builds that run at once (tests) take turns: the staging directory is locked.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-raftkvd}
binary=${BINARY:-}
if [ -z "$binary" ]; then
  cargo build --release
  binary=target/release/raftkvd
fi
root=target/image-root
mkdir -p target
exec 9>target/image-root.lock
flock 9
rm -rf "$root" target/image-data
mkdir -p "$root/bin" "$root/etc" target/image-data
cp "$binary" "$root/bin/raftkvd"
strip "$root/bin/raftkvd"
# The dynamic loader and every library the binary loads, at the paths it asks for.
ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
  while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
echo "raftkvd:x:10001:10001:raftkvd:/data:/bin/raftkvd" >"$root/etc/passwd"
echo "raftkvd:x:10001:" >"$root/etc/group"
docker build -q -t "$tag" . >/dev/null
echo "built image $tag: $(docker image inspect -f '{{.Size}}' "$tag" | awk '{ printf "%.1f MB", $1 / 1e6 }')"
