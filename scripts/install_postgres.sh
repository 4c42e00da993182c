#!/usr/bin/env bash
# Install Debian's PostgreSQL server when it is missing, for the test that runs a stage flow against a Prefect
# server on PostgreSQL (tests/flows/test_postgres.py; the team set-up of the README). Never fails: without it that
# test is skipped and says why. The test starts its own throw-away cluster on 127.0.0.1 (Debian may also
# start its default cluster, which the test does not use).
exec bash "$(dirname "$0")/install_debian.sh" postgresql "the PostgreSQL server test" initdb '/usr/lib/postgresql/*/bin/initdb'
