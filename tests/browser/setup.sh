#!/usr/bin/env bash
# Installs what tests/browser needs, idempotently: Debian's Chromium (/usr/bin/chromium, via apt) and
# playwright-core (npm, from package-lock.json, into tests/browser/node_modules). No browser download:
# drive.mjs launches /usr/bin/chromium. Run as root (apt); a second run changes nothing.
#   tests/browser/setup.sh            # before `make test`; the browser tests skip with a reason without it
set -euo pipefail
cd "$(dirname "$0")"

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if [ -z "${APT_UPDATED:-}" ]; then
        apt-get update -qq
        APT_UPDATED=1
    fi
    apt-get install -y -qq "$@" >/dev/null
}

if [ ! -x /usr/bin/chromium ]; then
    echo "browser tests: installing chromium (apt)"
    apt_install chromium
fi

if ! command -v npm >/dev/null 2>&1; then
    echo "browser tests: installing nodejs + npm (apt)"
    apt_install nodejs npm
fi

node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
    echo "browser tests: playwright-core needs node >= 20, found $(node --version)" >&2
    exit 1
fi

# npm ci only when node_modules is missing or older than the lock file
if [ ! -f node_modules/playwright-core/package.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    echo "browser tests: npm ci (playwright-core)"
    npm ci --no-audit --no-fund --loglevel=error
fi

/usr/bin/chromium --version 2>/dev/null | head -1
echo "playwright-core $(node -p 'require("./node_modules/playwright-core/package.json").version')"
