#!/usr/bin/env bash
# Installs everything the tests need, then runs them: the README's test command.
#
# The tests use real components, never stand-ins: a local Ray, the Serve app, an
# S3-protocol server on loopback (moto, a Python package), redis-server (the
# side-by-side test) and a headless chromium with chromedriver (the dashboard
# test).  The last two are system packages (no wheel of them installs on
# Debian/Ubuntu), so they come from apt when missing; everything else comes from
# the project's own files into .venv.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# Ray's token auth, chosen explicitly: the tests run a loopback-only cluster.  Left
# unset, the first ray.init() writes ~/.ray/auth_token, which silently turns a later
# `ray start` to token mode, and `ray job submit` without the token then fails.
export RAY_AUTH_MODE=disabled
# no cloud credentials are looked for: the only S3 server is the tests' own, on 127.0.0.1
export AWS_EC2_METADATA_DISABLED=true
export PIP_DISABLE_PIP_VERSION_CHECK=1

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
python3 -c "import ensurepip, venv" >/dev/null 2>&1 || need+=("python3-venv")
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: the tests need ${need[*]}; this machine has no apt-get, install them and run again" >&2
    exit 1
  fi
  echo "installing ${need[*]} (Debian packages the tests use) ..."
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 ||
    { $sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; } ||
    { echo "scripts/test.sh: could not install ${need[*]} with apt-get" >&2; exit 1; }
fi

python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
