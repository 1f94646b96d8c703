#!/usr/bin/env bash
# Build docker/Dockerfile without a Docker daemon: buildah (overlay storage, or vfs where the kernel has no
# overlay; chroot isolation) on a local Debian base made with debootstrap, with the CPU build of torch. The same Dockerfile a user builds on the CUDA base; only
# the build arguments differ:
#   BASE_IMAGE       a Debian minbase image committed from a debootstrap root filesystem (no registry needed)
#   TORCH_VERSION    2.13.0+cpu
#   TORCH_INDEX_URL  a PEP 503 index served on 127.0.0.1 for the build: the CPU torch wheel (TORCH_WHEEL_DIR)
#                    and its dependencies, pinned by requirements/image.txt
# Idempotent: the root filesystem, the base image and the torch index are cached (.image-cache/, buildah's
# store); buildah --layers reuses unchanged steps. Run as root from anywhere:  bash docker/build-local.sh
#
# Environment: SUITE (Debian release, default bookworm: python3 3.11, the Python of the CPU torch wheel),
# MIRROR, TORCH_VERSION, TORCH_WHEEL_DIR (where the +cpu wheel lies, default /opt/wheels), IMAGE and EXAMPLE_IMAGE
# (the tags built: docker/Dockerfile, and docker/Dockerfile.example FROM it),
# TORCH_INDEX_PORT (default 8765, on 127.0.0.1), SMOKE=0 to skip running `podtrain --help` and `podtrain smoke --allow-cpu` in the built image.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${CACHE:-$ROOT/.image-cache}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
TORCH_VERSION=${TORCH_VERSION:-2.13.0+cpu}
TORCH_WHEEL_DIR=${TORCH_WHEEL_DIR:-/opt/wheels}
VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -n1)
IMAGE=${IMAGE:-localhost/podtrain:$VERSION-cpu}
EXAMPLE_IMAGE=${EXAMPLE_IMAGE:-localhost/podtrain-example:$VERSION-cpu}
SMOKE=${SMOKE:-1}
# overlay where this kernel mounts it (a layer costs its own bytes only, and a container starts without copying
# the image), else vfs (every layer and every container a full copy of the root filesystem).
STORAGE_DRIVER=${STORAGE_DRIVER:-auto}

log() { printf '[build-local %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
bh() { buildah --storage-driver "$STORAGE_DRIVER" "$@"; }

storage_driver() {
    [[ $STORAGE_DRIVER != auto ]] && return 0
    local probe
    probe=$(mktemp -d)
    mkdir "$probe"/{lower,upper,work,merged}
    if mount -t overlay overlay -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" \
        "$probe/merged" 2>/dev/null; then
        umount "$probe/merged"
        STORAGE_DRIVER=overlay
    else
        STORAGE_DRIVER=vfs
    fi
    rm -rf "$probe"
    log "storage driver: $STORAGE_DRIVER"
}

need() {
    local missing=()
    command -v buildah >/dev/null || missing+=(buildah)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    # podman and runc run the built image in the image tests (make image-test); not needed to build it.
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    if ((${#missing[@]})); then
        log "installing ${missing[*]} (apt)"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    fi
}

# 1. The base: debootstrap --variant=minbase, kept as a tarball, committed as localhost/debian-minbase:<12.x>.
base_image() {
    local rootfs="$CACHE/rootfs-$SUITE.tar" tmp version ctr mnt
    mkdir -p "$CACHE"
    if [[ ! -s $rootfs ]]; then
        tmp="$CACHE/rootfs-$SUITE.tmp"
        rm -rf "$tmp"
        log "debootstrap --variant=minbase $SUITE (about a minute)"
        debootstrap --variant=minbase "$SUITE" "$tmp" "$MIRROR" >"$CACHE/debootstrap-$SUITE.log" 2>&1 ||
            { tail -n 20 "$CACHE/debootstrap-$SUITE.log" >&2; exit 1; }
        # Security and point-release updates too, as Debian's own images have them; no package cache.
        cat >"$tmp/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${MIRROR%/debian}/debian-security $SUITE-security main
EOF
        rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*
        tar -C "$tmp" --numeric-owner -cf "$rootfs.part" .
        mv "$rootfs.part" "$rootfs"
        rm -rf "$tmp"
    fi
    version=$(tar -xOf "$rootfs" ./etc/debian_version)
    BASE_IMAGE="localhost/debian-minbase:$version"
    # Where this machine reaches the package registry through a TLS proxy with its own certificate authority
    # (PIP_CERT, or BUILD_CA), the base trusts it as this machine does: the bundle and an /etc/pip.conf naming it
    # are part of this local base, as a site's own base image carries its site's CA. The Dockerfile is untouched.
    local ca=${BUILD_CA:-${PIP_CERT:-}} ca_sum=none
    [[ -n $ca ]] && ca_sum=$(sha256sum "$ca" | cut -c1-16)
    if [[ $(bh inspect --type image --format '{{index .OCIv1.Config.Labels "podtrain.build-ca"}}' "$BASE_IMAGE" \
        2>/dev/null) != "$ca_sum" ]]; then
        log "committing $BASE_IMAGE from $rootfs (pip CA: ${ca:-none})"
        ctr=$(bh from scratch)
        mnt=$(bh mount "$ctr")
        tar -C "$mnt" --numeric-owner -xf "$rootfs"
        if [[ -n $ca ]]; then
            install -m 0644 "$ca" "$mnt/etc/pip-ca.pem"
            printf '[global]\ncert = /etc/pip-ca.pem\n' >"$mnt/etc/pip.conf"
        fi
        bh umount "$ctr" >/dev/null
        bh config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash \
            --label "org.opencontainers.image.title=debian-minbase" \
            --label "org.opencontainers.image.version=$version" --label "podtrain.build-ca=$ca_sum" "$ctr"
        bh commit --quiet "$ctr" "$BASE_IMAGE" >/dev/null
        bh rm "$ctr" >/dev/null
    fi
}

# 2. The torch index: the CPU wheel and its dependencies (at image.txt's pins) as a PEP 503 index.
torch_index() {
    local index="$CACHE/torch-index" stamp wheel name
    stamp="$index/.$TORCH_VERSION"
    if [[ ! -e $stamp ]]; then
        log "preparing the torch $TORCH_VERSION index from $TORCH_WHEEL_DIR and the package registry"
        rm -rf "$index"
        mkdir -p "$index/files"
        PIP_CONFIG_FILE=/dev/null python3 -m pip download --quiet --disable-pip-version-check --progress-bar off \
            --only-binary=:all: --find-links "$TORCH_WHEEL_DIR" -c "$ROOT/requirements/image.txt" \
            --dest "$index/files" "torch==$TORCH_VERSION"
        for wheel in "$index"/files/*.whl; do
            name=$(basename "$wheel" | cut -d- -f1 | tr '[:upper:]_.' '[:lower:]--')
            mkdir -p "$index/simple/$name"
            printf '<a href="../../files/%s">%s</a>\n' "$(basename "$wheel")" "$(basename "$wheel")" \
                >>"$index/simple/$name/index.html"
        done
        touch "$stamp"
    fi
    # A fixed port: TORCH_INDEX_URL is a build argument, part of the torch layer's cache key.
    PORT=${TORCH_INDEX_PORT:-8765}
    python3 -m http.server --bind 127.0.0.1 --directory "$index" "$PORT" >"$CACHE/torch-index.log" 2>&1 &
    SERVER=$!
    trap 'kill "$SERVER" 2>/dev/null || true' EXIT
    for _ in $(seq 50); do
        kill -0 "$SERVER" 2>/dev/null || break
        curl -fs -o /dev/null "http://127.0.0.1:$PORT/simple/torch/" && return 0
        sleep 0.1
    done
    log "the torch index on 127.0.0.1:$PORT did not start"
    exit 1
}

# 3. The image's size, layer by layer: uncompressed (local storage) and gzip-compressed as a registry stores it
# (buildah push to an OCI layout). Computed once per image ID, kept in .image-cache/.
report_sizes() {
    local id report layout
    id=$(bh inspect --type image --format '{{.FromImageID}}' "$1")
    report="$CACHE/sizes-${id:0:16}.txt"
    if [[ ! -s $report ]]; then
        layout=$(mktemp -d)
        bh push --quiet --compression-format gzip "$1" "oci:$layout" >/dev/null
        bh inspect --type image "$1" | python3 -c '
import json, pathlib, sys
local = json.loads(json.load(sys.stdin)["Manifest"])["layers"]
layout = pathlib.Path(sys.argv[1])
blob = lambda d: layout / "blobs" / d.replace(":", "/")
(entry,) = json.loads((layout / "index.json").read_text())["manifests"]
pushed = json.loads(blob(entry["digest"]).read_text())["layers"]
mb = lambda n: f"{n / 1e6:8.1f} MB"
for n, (a, b) in enumerate(zip(local, pushed)):
    raw, gz = a["size"], b["size"]
    print(f"  layer {n}: {mb(raw)} uncompressed, {mb(gz)} gzip")
total = lambda ls: sum(x["size"] for x in ls)
print(f"  image:   {mb(total(local))} uncompressed, {mb(total(pushed))} gzip")
' "$layout" >"$report.part"
        rm -rf "$layout"
        mv "$report.part" "$report"
    fi
    log "$1 size:"
    cat "$report" >&2
}

main() {
    local start=$SECONDS t
    [[ $(id -u) == 0 ]] || { log "run as root (buildah's chroot isolation and its storage need it)"; exit 1; }
    need
    storage_driver
    base_image
    torch_index
    log "buildah bud -f docker/Dockerfile -t $IMAGE (base $BASE_IMAGE, torch $TORCH_VERSION)"
    t=$SECONDS
    bh bud --isolation chroot --layers --pull=never -f "$ROOT/docker/Dockerfile" -t "$IMAGE" \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        --build-arg "TORCH_VERSION=$TORCH_VERSION" \
        --build-arg "TORCH_INDEX_URL=http://127.0.0.1:$PORT/simple" \
        "$ROOT"
    log "built $IMAGE in $((SECONDS - t)) s"
    report_sizes "$IMAGE"

    # The training image a user builds FROM this one (docker/Dockerfile.example), on the image just built.
    t=$SECONDS
    bh bud --isolation chroot --layers --pull=never -f "$ROOT/docker/Dockerfile.example" -t "$EXAMPLE_IMAGE" \
        --build-arg "BASE_IMAGE=$IMAGE" "$ROOT"
    log "built $EXAMPLE_IMAGE in $((SECONDS - t)) s"

    if [[ $SMOKE == 1 ]]; then
        # The image's own USER (1000:1000), environment and working directory; `buildah run` does not apply the
        # ENTRYPOINT, so the command is given in full.
        ctr=$(bh from --pull=never "$IMAGE")
        trap 'kill "$SERVER" 2>/dev/null || true; bh rm "$ctr" >/dev/null 2>&1 || true' EXIT
        bh run --isolation chroot "$ctr" -- id
        bh run --isolation chroot "$ctr" -- podtrain --help >/dev/null
        bh run --isolation chroot "$ctr" -- podtrain smoke --allow-cpu
        log "podtrain --help and podtrain smoke --allow-cpu ran in $IMAGE as its non-root user"
    fi
    log "done in $((SECONDS - start)) s"
}

main "$@"
