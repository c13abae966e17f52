#!/usr/bin/env bash
# One-time set-up of a fresh machine: the system packages (Fashion-MNIST, Mosquitto) and a
# virtualenv with gefl-edge installed in editable mode plus its dev tools. Safe to run again.
set -euo pipefail
venv=${1:-.venv}
cd "$(dirname "$0")/.."

missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
# Headless Chromium and its driver: tests/test_status.py opens the aggregator's status page in them.
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "setup: need root to install ${missing[*]}: run 'apt-get install -y ${missing[*]}' as root" >&2; exit 1
  fi
  echo "setup: installing system packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating virtualenv $venv"
  python3 -m venv "$venv"
fi
echo "setup: installing gefl-edge and its dependencies into $venv (torch is large: a few minutes the first time)"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e ".[train,dev]"
