#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: Debian's Fashion-MNIST, a virtual environment in .venv with
# the harness and its pinned dependencies. Fast when nothing changed (a stamp holds pyproject's hash).
#   scripts/setup.sh            the harness and its test dependencies (Ray included, for its executor's tests)
#   scripts/setup.sh --browser  also Debian's Chromium, for the report's browser test
set -euo pipefail
cd "$(dirname "$0")/.."

want_browser=0
[[ "${1:-}" == "--browser" ]] && want_browser=1

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

debian_packages=()
[[ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]] || debian_packages+=(dataset-fashion-mnist)
if [[ $want_browser -eq 1 ]] && ! command -v chromium >/dev/null; then
    debian_packages+=(chromium fonts-dejavu-core)
fi
if [[ ${#debian_packages[@]} -gt 0 ]]; then
    echo "setup: installing Debian packages: ${debian_packages[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debian_packages[@]}" >/dev/null
fi

python=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
stamp=.venv/.harness-installed
digest=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$digest" ]]; then
    echo "setup: installing the harness and its dependencies into .venv (torch takes about a minute)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    echo "$digest" > "$stamp"
fi
echo "setup: ready (.venv/bin/harness)"
