#!/usr/bin/env bash
# Idempotent set-up for building and running the deploy/ images with podman, as root, without Docker and
# without an image registry (CI runs this through `make test` on a fresh Debian 12 machine):
#
#   1. podman, buildah, runc, debootstrap and catatonit (the pause process `podman kube play` builds its
#      infra image from; only a Recommends of podman, so a podman installed without recommends lacks it)
#      from Debian's archive (apt-get) when missing;
#   2. /etc/containers/containers.conf when absent: runc (crun fails on cgroups/rlimits here), cgroupfs,
#      explicit nofile/nproc ulimits;
#   3. the local base image $MPMRI_BASE_IMAGE (default localhost/mpmri-base:bookworm-py3.11): Debian 12
#      minbase from debootstrap plus CPython 3.11 (python3, python3-venv, libpython3.11), imported with
#      `podman import`. It stands in for python:3.11-slim-bookworm, the production base of both CPU
#      Dockerfiles (ARG BASE_IMAGE). It has no PATH set: the Dockerfiles set ENV PATH themselves.
#
# Prints the base image name on success. Set MPMRI_REBUILD_BASE=1 to rebuild the base image.
set -euo pipefail
BASE_IMAGE="${MPMRI_BASE_IMAGE:-localhost/mpmri-base:bookworm-py3.11}"
SUITE="bookworm"
INCLUDE="python3,python3-venv,libpython3.11,ca-certificates"

missing=()
for tool in podman buildah runc debootstrap catatonit; do
  command -v "$tool" >/dev/null 2>&1 || [[ -x "/usr/sbin/$tool" ]] || missing+=("$tool")
done
if ((${#missing[@]})); then
  echo "installing ${missing[*]} (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends "${missing[@]}" uidmap slirp4netns fuse-overlayfs >&2
fi

CONF=/etc/containers/containers.conf
if [[ ! -s "$CONF" ]]; then
  mkdir -p /etc/containers
  cat >"$CONF" <<'EOF'
# Written by mpmri-serve scripts/setup_containers.sh: crun fails on cgroups and rlimits on these machines.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
  echo "wrote $CONF" >&2
fi

if [[ "${MPMRI_REBUILD_BASE:-0}" != "1" ]] && podman image exists "$BASE_IMAGE"; then
  echo "$BASE_IMAGE"
  exit 0
fi

ROOTFS="$(mktemp -d /var/tmp/mpmri-rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT
echo "debootstrap --variant=minbase $SUITE (+ $INCLUDE) -> $BASE_IMAGE" >&2
MIRROR="$(bash "$(dirname "$0")/debian_mirror.sh")"  # the archive this machine's apt uses
debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$ROOTFS" "$MIRROR" >&2
# a smaller image: apt lists and caches, docs and locales are not needed at run time
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
  "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*
tar -C "$ROOTFS" -c . | podman import \
  --change 'ENV LANG=C.UTF-8' \
  --message "Debian $SUITE minbase + CPython 3.11 (mpmri-serve scripts/setup_containers.sh)" \
  - "$BASE_IMAGE" >&2
echo "$BASE_IMAGE"
