#!/usr/bin/env bash
# The browser the console tests drive (tests/it/console.rs): Debian's chromium and its
# WebDriver server, chromedriver (package chromium-driver).
#
#   scripts/browser.sh          install them with apt-get when missing, then check them
#   scripts/browser.sh check    only check them (exit 1 when either is missing or broken)
#
# Idempotent: with both installed it only prints their versions. Installing needs root
# (or sudo); it waits up to 5 minutes for another apt to let go of its locks.
set -euo pipefail

readonly PROG="scripts/browser.sh"
readonly PACKAGES=(chromium chromium-driver)

log() { printf 'browser: %s\n' "$*"; }
err() { printf 'browser: ERROR: %s\n' "$*" >&2; }
die() { err "$@"; exit 1; }

# as_root CMD...: CMD as root, directly or through sudo.
as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root to run '$*' (not root and no sudo); install ${PACKAGES[*]} by hand"
  fi
}

# apt_get ARGS...: apt-get as root, non-interactive, waiting for apt's locks.
apt_get() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 "$@"
}

installed() {
  command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1
}

# install: one `apt-get update` and one `apt-get install` of both packages.
install() {
  command -v apt-get >/dev/null 2>&1 ||
    die "chromium or chromedriver is missing and this is no Debian machine (no apt-get)"
  local apt_log
  apt_log=$(mktemp -t jobgate-browser-apt.XXXXXX)
  log "installing ${PACKAGES[*]} with apt-get (log: $apt_log)"
  if ! { apt_get update && apt_get install -y --no-install-recommends "${PACKAGES[@]}"; } >"$apt_log" 2>&1; then
    tail -n 20 "$apt_log" >&2 || true
    die "apt-get could not install ${PACKAGES[*]} (see $apt_log)"
  fi
  log "installed ${PACKAGES[*]}"
}

# check: both run and say their versions.
check() {
  local chromium_version driver_version
  command -v chromium >/dev/null 2>&1 || die "chromium is not installed: run $PROG"
  command -v chromedriver >/dev/null 2>&1 || die "chromedriver is not installed: run $PROG"
  chromium_version=$(chromium --version 2>/dev/null) || die "'chromium --version' failed"
  driver_version=$(chromedriver --version 2>/dev/null) || die "'chromedriver --version' failed"
  log "$chromium_version"
  log "$driver_version"
}

case "${1:-up}" in
  up)
    installed || install
    check
    ;;
  check) check ;;
  *) die "usage: $PROG [up|check]" ;;
esac
