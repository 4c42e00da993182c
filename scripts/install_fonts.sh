#!/usr/bin/env bash
# Install a CJK font from the OS packages when we can, so the synthetic generator renders Chinese.
# Never fails: without a CJK font the generator falls back to Latin text with one warning.
if command -v fc-list >/dev/null 2>&1 && [ -n "$(fc-list :lang=zh file 2>/dev/null)" ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  echo "installing a CJK font (fonts-droid-fallback) for the synthetic data generator..."
  (apt-get update -qq >/dev/null 2>&1 && \
   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-droid-fallback fontconfig >/dev/null 2>&1) \
    || echo "warning: could not install a CJK font; synthetic data will be Latin only"
else
  echo "note: no CJK font found and cannot install one (not root or no apt-get); synthetic data will be Latin only"
fi
exit 0
