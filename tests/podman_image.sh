#!/bin/bash
# The docker sandbox's test image, made without a registry (this machine reaches none): a Debian
# bookworm rootfs from Debian's own mirror (debootstrap), with bash, coreutils, python3 and pytest,
# imported into podman as localhost/arborl-sandbox-test:bookworm. Idempotent; prints the image name.
set -euo pipefail
image=localhost/arborl-sandbox-test:bookworm
if podman image exists "$image" 2>/dev/null; then echo "$image"; exit 0; fi
rootfs=$(mktemp -d /tmp/arborl-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
debootstrap --variant=minbase --include=python3,python3-pytest,procps bookworm "$rootfs" "$mirror" >&2
tar -C "$rootfs" -c . | podman import - "$image" >&2
echo "$image"
