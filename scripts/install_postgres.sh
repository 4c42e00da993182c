#!/usr/bin/env bash
# Install Debian's PostgreSQL server when it is missing, for the test that runs a stage flow against a Prefect
# server on PostgreSQL (tests/test_postgres.py; the team set-up of the README). Never fails: without it that
# test is skipped and says why. The test starts its own throw-away cluster on 127.0.0.1; nothing is enabled.
if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  echo "installing postgresql (Debian package) for the PostgreSQL server test..."
  (apt-get update -qq >/dev/null 2>&1 && \
   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null 2>&1) \
    || echo "warning: could not install postgresql; the PostgreSQL test will be skipped"
else
  echo "note: no PostgreSQL and cannot install it (not root or no apt-get); the PostgreSQL test will be skipped"
fi
exit 0
