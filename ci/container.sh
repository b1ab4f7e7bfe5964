#!/usr/bin/env bash
# The container engine for CI and for people without a registry.
#
#   ci/container.sh setup          install podman + runc (Debian), once
#   ci/container.sh base           the local base image, from Debian's packages
#   ci/container.sh build [TAG]    build ./Dockerfile on that base (cached layers)
#   ci/container.sh flags          print the flags podman needs here: engine|run|CONTAINERS_CONF
#
# Environment: OCTO_IMAGE (default localhost/octo-proxy), OCTO_BASE (the
# base image; default: the local one this script builds), OCTO_IMAGE_ID (the
# image identity baked in; default: version + commit + TAG).
# docs/operating.md "In a container" explains every flag used here.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${OCTO_BASE:-localhost/octo-proxy-base:bookworm}
IMAGE=${OCTO_IMAGE:-localhost/octo-proxy}
CACHE=${OCTO_CACHE:-/var/cache/octo-proxy-ci}

# The engine runs rootful with runc and cgroupfs (cgroup v1 here); builds use
# the host network.  The limits are explicit: podman's default
# (nofile=nproc=1048576) is above this sandbox's hard limits and runc then
# fails with "error setting rlimit type 7 (nofile) / 6 (nproc): operation not
# permitted".  nofile: the caller's hard limit.  nproc: at most
# kernel.pid_max, because podman lowers its own RLIMIT_NPROC to that value
# (32768 here, below the shell's 96365) and runc, its grandchild, cannot
# raise it again.  A pod's infra container takes no --ulimit flag, so the
# same limits also go into a containers.conf (CONTAINERS_CONF) for it.
nofile=$(ulimit -Hn); nproc=$(ulimit -Hu); pid_max=$(cat /proc/sys/kernel/pid_max)
[ "$nofile" = unlimited ] && nofile=1048576
[ "$nproc" = unlimited ] && nproc=$pid_max
[ "$nproc" -gt "$pid_max" ] && nproc=$pid_max
ENGINE_FLAGS=(--runtime runc --cgroup-manager cgroupfs)
RUN_FLAGS=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
mkdir -p "$CACHE"
export CONTAINERS_CONF="$CACHE/containers.conf"
printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=%s:%s"]\n' \
  "$nofile" "$nofile" "$nproc" "$nproc" > "$CONTAINERS_CONF.tmp"
mv "$CONTAINERS_CONF.tmp" "$CONTAINERS_CONF"

apt_install() {
  if [ "$(id -u)" != 0 ]; then echo "need root to install $*" >&2; return 1; fi
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "$@" >/dev/null \
    || { apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null; \
         DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "$@" >/dev/null; }
}

setup() {
  local need=()
  command -v podman >/dev/null || need+=(podman)
  command -v runc >/dev/null || need+=(runc)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  # pods: podman builds its pause image from catatonit when no registry has one
  command -v catatonit >/dev/null || [ -x /usr/libexec/podman/catatonit ] || need+=(catatonit)
  if [ ${#need[@]} -gt 0 ]; then
    echo "container: installing ${need[*]}" >&2
    apt_install "${need[@]}"
  fi
}

base() {
  setup
  if podman "${ENGINE_FLAGS[@]}" image exists "$BASE_IMAGE"; then return 0; fi
  # No registry: Debian's own packages into a root file system (debootstrap,
  # the same archive apt uses here), imported as an image.  What
  # python:3.11-slim offers the Dockerfile: python3 with venv, apt-get,
  # useradd, CA certificates.
  local mirror suite rootfs t0=$SECONDS
  mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
  mirror=${mirror:-http://deb.debian.org/debian}
  suite=bookworm
  mkdir -p "$CACHE/debs"
  rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' RETURN
  echo "container: building $BASE_IMAGE from Debian $suite packages ($mirror)" >&2
  debootstrap --variant=minbase --cache-dir="$CACHE/debs" \
    --include=python3,python3-venv,ca-certificates "$suite" "$rootfs" "$mirror" \
    >"$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log" >&2; return 1; }
  printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$mirror" "$suite" "$suite" > "$rootfs/etc/apt/sources.list.d/debian.sources"
  rm -f "$rootfs/etc/apt/sources.list"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
  tar -C "$rootfs" -c . | podman "${ENGINE_FLAGS[@]}" import -q \
    --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$BASE_IMAGE" >/dev/null
  echo "container: $BASE_IMAGE built in $((SECONDS - t0)) s" >&2
}

build() {
  local tag=${1:-latest} id version t0=$SECONDS
  [ -n "${OCTO_BASE:-}" ] || base
  setup
  version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' src/octoproxy/__init__.py | head -1)
  id=${OCTO_IMAGE_ID:-$version-$(git rev-parse --short HEAD 2>/dev/null || echo src)-$tag}
  local secret=()
  # pip in the build trusts the host's CA bundle (a TLS-re-signing proxy)
  local cert=${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}
  [ -n "$cert" ] && [ -s "$cert" ] && secret=(--secret "id=pip_cert,src=$cert")
  # --format docker keeps HEALTHCHECK (the OCI format has no field for it);
  # --env/--label repeat the image id: buildah 1.28's layer cache ignores
  # build-arg values, so two builds differing only in OCTO_IMAGE_ID would
  # otherwise give the same image (with the first id);
  # --network host: apt and pip reach the registries as the host does
  podman "${ENGINE_FLAGS[@]}" build -q --format docker --network host --layers \
    "${RUN_FLAGS[@]}" "${secret[@]}" \
    --build-arg "BASE=$BASE_IMAGE" --build-arg "OCTO_IMAGE_ID=$id" \
    --env "OCTO_PROXY_IMAGE_ID=$id" --label "io.octo-proxy.image-id=$id" \
    -t "$IMAGE:$tag" -f Dockerfile . >/dev/null
  echo "container: $IMAGE:$tag ($id) built in $((SECONDS - t0)) s" >&2
}

case "${1:-}" in
  setup) setup ;;
  base) base ;;
  build) shift; build "$@" ;;
  flags) echo "${ENGINE_FLAGS[*]}|${RUN_FLAGS[*]}|$CONTAINERS_CONF" ;;
  *) sed -n '2,12p' "$0" >&2; exit 64 ;;
esac
