#!/usr/bin/env bash
# Debian's Chromium and ChromeDriver for the report.html tests (root and apt-get), where missing.
set -euo pipefail
[[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]] && exit 0
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
