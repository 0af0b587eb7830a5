#!/usr/bin/env bash
# Makes a local base image with Python 3 for machines that cannot pull one from a registry:
# debootstrap a minimal Debian 12 (python3 + venv) from the mirror apt already uses, import it
# into podman. Prints the image name. Skips the work when the image already exists.
#   docker/local-base-image.sh [IMAGE]     (default localhost/quantserve-base:bookworm)
set -euo pipefail
IMAGE=${1:-localhost/quantserve-base:bookworm}
if podman image exists "$IMAGE"; then echo "$IMAGE"; exit 0; fi
MIRROR=${DEBIAN_MIRROR:-$( (cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null || true) \
    | grep -oE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' | grep -oE 'https?://[^ ]+' | head -n1 || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOT" "$MIRROR" >&2
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
tar -C "$ROOT" -c . | podman import --change 'CMD ["/bin/bash"]' - "$IMAGE" >&2
echo "$IMAGE"
