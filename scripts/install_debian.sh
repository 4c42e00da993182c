#!/usr/bin/env bash
# install_debian.sh PACKAGE WHAT PROBE...: install Debian's PACKAGE (for WHAT, a test that needs it) unless one of
# the PROBE paths or commands already exists. Never fails: without the package the test is skipped and says why.
package=$1 what=$2
shift 2
for probe in "$@"; do
  if command -v "$probe" >/dev/null 2>&1 || compgen -G "$probe" >/dev/null; then
    exit 0
  fi
done
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  echo "installing $package (Debian package) for $what..."
  (apt-get update -qq >/dev/null 2>&1 && \
   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null 2>&1) \
    || echo "warning: could not install $package; $what will be skipped"
else
  echo "note: no $package and cannot install it (not root or no apt-get); $what will be skipped"
fi
exit 0
