#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks need, when they are missing.
# astrometry.net + Tycho-2 index files: plate solving; source-extractor + psfex: reference
# measurements the tests compare against.
set -euo pipefail
packages=(
  astrometry.net
  astrometry-data-tycho2-07-littleendian
  astrometry-data-tycho2-08-littleendian
  astrometry-data-tycho2-09-littleendian
  astrometry-data-tycho2-10-19-littleendian
  source-extractor
  psfex
)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing system packages: ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
