#!/usr/bin/env bash
# Install Debian's chromium when it is missing, for the test that opens the UI's artifact pages
# (tests/flows/test_ui_browser.py). Never fails: without it that test is skipped and says why.
exec bash "$(dirname "$0")/install_debian.sh" chromium "the UI browser test" chromium chromium-browser
