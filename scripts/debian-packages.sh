# Sourced by the install scripts: install_missing PKG... installs the Debian packages given, as root
# with apt-get; it returns 1 (having said why) when there is nothing to do or it cannot install.
install_missing() {
  if [ $# -eq 0 ]; then
    return 1
  fi
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "missing Debian packages: $* (run as root on Debian, or install them yourself)" >&2
    return 1
  fi
  echo "installing Debian packages: $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
