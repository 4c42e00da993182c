#!/usr/bin/env bash
# Install Debian's chromium when it is missing, for the test that opens the UI's artifact pages
# (tests/test_ui_browser.py). Never fails: without it that test is skipped and says why.
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  echo "installing chromium for the UI browser test..."
  (apt-get update -qq >/dev/null 2>&1 && \
   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) \
    || echo "warning: could not install chromium; the UI browser test will be skipped"
else
  echo "note: no chromium and cannot install it (not root or no apt-get); the UI browser test will be skipped"
fi
exit 0
