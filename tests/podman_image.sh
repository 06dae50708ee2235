#!/bin/bash
# The docker sandbox's test image, made without a registry (this machine reaches none): a Debian
# bookworm rootfs from Debian's own mirror (debootstrap), with bash, coreutils, python3 and pytest,
# imported into podman as localhost/arborl-sandbox-test:bookworm. Idempotent; prints the image name
# once a container of it has run here (else fails, and the docker sandbox's tests are skipped).
set -euo pipefail
image=localhost/arborl-sandbox-test:bookworm
here=$(cd "$(dirname "$0")" && pwd)
runs() {  # the engine runs a container of it here, as the sandbox will ask
    "$here/podman_docker" run --rm --cap-drop ALL --cap-add CHOWN --security-opt no-new-privileges \
        "$image" bash -c 'timeout 5 true && python3 -m pytest --version' >&2
}
if podman image exists "$image" 2>/dev/null; then runs && echo "$image"; exit; fi
rootfs=$(mktemp -d /tmp/arborl-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
debootstrap --variant=minbase --include=python3,python3-pytest,procps bookworm "$rootfs" "$mirror" >&2
tar -C "$rootfs" -c . | podman import - "$image" >&2
runs && echo "$image"
