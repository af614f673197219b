#!/usr/bin/env bash
# Build the voxswap container image from this checkout:  ./scripts/build-image.sh [TAG]
#
# TAG defaults to voxswap:latest; `--print-engine` instead of a TAG prints the engine with its
# global flags (line 1) and the flags its `run` needs on this machine (line 2). docker is used when
# its daemon answers, else podman (scripts/install-container-deps.sh installs it on Debian, and runs
# from here when neither is present). The base is BASE_IMAGE when set, else
# the Dockerfile's default (the official slim Python image) when a container registry answers;
# where none is reachable, a Debian bookworm base is made here with debootstrap (root needed; the
# archive is debootstrap's default, or DEBIAN_MIRROR) and imported as voxswap-base:bookworm.
#
# pip inside the build resolves exactly as pip does on this machine: the CA bundle (PIP_CERT, else
# SSL_CERT_FILE, else pip's own `cert` setting) and pip's index, find-links and constraint settings
# (environment first, then pip's config files) travel as build secrets, and local folders they name
# are mounted read-only for the build (podman); nothing of it is written into the image.
#
# Environment: BASE_IMAGE, CONTAINER_ENGINE (docker|podman), DEBIAN_MIRROR,
# CONTAINER_ENGINE_FLAGS (global flags for podman; detected when unset, see engine_flags below).
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-voxswap:latest}"

pick_engine() {
  if [ -n "${CONTAINER_ENGINE:-}" ]; then echo "$CONTAINER_ENGINE"; return; fi
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then echo docker; return; fi
  command -v podman >/dev/null 2>&1 || ./scripts/install-container-deps.sh >&2  # podman on Debian, as root
  if command -v podman >/dev/null 2>&1; then echo podman; return; fi
  echo "neither a running docker nor podman is available (scripts/install-container-deps.sh)" >&2
  exit 1
}

# Global podman flags for a machine where the defaults do not work: cgroup v1 or hybrid hierarchies
# (crun fails there; runc with the cgroupfs manager works) and hard open-file/process limits below
# what podman asks for by default (its ulimits are then lowered to fit). Prints "flags|run flags".
engine_flags() {
  local global="" run=""
  if [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" != cgroup2fs ] && command -v runc >/dev/null 2>&1; then
    global="--runtime runc --cgroup-manager=cgroupfs"
  fi
  if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt 1048576 ]; then
    run="--ulimit nofile=1024:1024 --ulimit nproc=1024:1024"
  fi
  echo "$global|$run"
}

engine="$(pick_engine)"
global_flags=() run_flags=()
if [ "$engine" = podman ]; then
  IFS='|' read -r g r <<<"$(engine_flags)"
  read -r -a global_flags <<<"${CONTAINER_ENGINE_FLAGS-$g}"
  read -r -a run_flags <<<"$r"
fi
eng() { "$engine" "${global_flags[@]}" "$@"; }
if [ "$tag" = --print-engine ]; then
  echo "$engine ${global_flags[*]}"
  echo "${run_flags[*]}"
  exit 0
fi

# -- the base image ---------------------------------------------------------------------------------
default_base="$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile | head -n1)"
base="${BASE_IMAGE:-}"
if [ -z "$base" ]; then
  if eng image inspect "$default_base" >/dev/null 2>&1 || timeout 300 "$engine" "${global_flags[@]}" pull -q "$default_base" >/dev/null 2>&1; then
    base="$default_base"
  else
    base="voxswap-base:bookworm"
    if ! eng image inspect "$base" >/dev/null 2>&1; then
      echo "no container registry answers for $default_base: making $base with debootstrap"
      if [ "$(id -u)" -ne 0 ] || ! command -v debootstrap >/dev/null 2>&1; then
        echo "debootstrap needs root and the debootstrap package (scripts/install-container-deps.sh);" \
             "or set BASE_IMAGE to an image with python3 and its venv module" >&2
        exit 1
      fi
      rootfs="$(mktemp -d /var/tmp/voxswap-rootfs.XXXXXX)"
      trap 'rm -rf "$rootfs"' EXIT
      mirror=()
      [ -n "${DEBIAN_MIRROR:-}" ] && mirror=("$DEBIAN_MIRROR")
      debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "${mirror[@]}" >/dev/null
      rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
             "$rootfs"/var/log/* "$rootfs"/tmp/*
      tar -C "$rootfs" --numeric-owner -c . | eng import --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
      rm -rf "$rootfs"
      trap - EXIT
    fi
  fi
fi

# -- what pip needs, as secrets ---------------------------------------------------------------------
secrets_dir="$(mktemp -d)"
trap 'rm -rf "$secrets_dir"' EXIT
host_pip=(python3 -m pip)
[ -x .venv/bin/pip ] && host_pip=(.venv/bin/pip)
pip_config="$("${host_pip[@]}" config list 2>/dev/null || true)"
pip_setting() {  # $1: pip's option name; the environment wins over the config files, as in pip
  local env_name="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')"
  if [ -n "${!env_name:-}" ]; then echo "${!env_name}"; return; fi
  printf '%s\n' "$pip_config" | sed -n "s/^[a-z:]*\.$1='\(.*\)'\$/\1/p" | tail -n1
}
cert="${PIP_CERT:-${SSL_CERT_FILE:-$(pip_setting cert)}}"
: >"$secrets_dir/pip_cert"  # both secrets always exist; an empty one is ignored by the build
if [ -n "$cert" ] && [ -s "$cert" ]; then cp "$cert" "$secrets_dir/pip_cert"; fi
volumes=()
: >"$secrets_dir/pip_env"
for option in index-url extra-index-url find-links constraint trusted-host no-index default-timeout retries; do
  value="$(pip_setting "$option")"
  [ -n "$value" ] || continue
  kept=()
  for item in $value; do  # pip splits these lists on whitespace too
    path="${item#file://}"
    if [ "${path:0:1}" = / ]; then
      if [ ! -e "$path" ]; then continue; fi
      if [ "$engine" != podman ]; then
        echo "note: $option $item is a local path; docker cannot mount it into a build, so it is left out"
        continue
      fi
      mount="$path"
      # a local index's pages link to files beside it (<root>/simple and <root>/files): mount <root>
      case "$option" in *index-url) mount="$(dirname "${path%/}")" ;; esac
      volumes+=(--volume "$mount:$mount:ro")
    fi
    kept+=("$item")
  done
  [ ${#kept[@]} -gt 0 ] || continue
  joined="${kept[*]}"
  printf "PIP_%s='%s'\n" "$(echo "$option" | tr 'a-z-' 'A-Z_')" "${joined//\'/\'\\\'\'}" >>"$secrets_dir/pip_env"
done

# -- the build --------------------------------------------------------------------------------------
echo "building $tag with $engine from $base"
started=$(date +%s)
build=(build --network=host -t "$tag" --build-arg "BASE_IMAGE=$base"
       --secret "id=pip_cert,src=$secrets_dir/pip_cert" --secret "id=pip_env,src=$secrets_dir/pip_env")
if [ "$engine" = podman ]; then
  # docker format keeps the HEALTHCHECK (the OCI format has no field for it)
  eng "${build[@]}" --format docker "${run_flags[@]}" "${volumes[@]}" .
else
  DOCKER_BUILDKIT=1 eng "${build[@]}" .
fi
size="$(eng image inspect --format '{{.Size}}' "$tag")"
echo "built $tag in $(( $(date +%s) - started )) s: $(( size / 1000000 )) MB ($engine image inspect)"
