#!/usr/bin/env bash
# One-stop set-up for a fresh machine: creates .venv (once), installs hsface with its dev extras,
# then runs one of the project's jobs.
#   ./dev.sh build [hsface build args]   generate the smallest HSFace config (random-tiny weights, offline)
#   ./dev.sh test  [pytest args]         run the test suite (offline)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
venv=${HSFACE_VENV:-.venv}
stamp=$venv/.hsface-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp || .ci/constraints.txt -nt $stamp ]]; then
  echo "== installing hsface into $venv (first run: a few minutes)" >&2
  python3 -m venv "$venv"
  # The constraints pin the torch build that runs with torchvision on the project's CPU machines.
  "$venv/bin/pip" install --quiet --disable-pip-version-check -c .ci/constraints.txt -e ".[dev]"
  # face-alignment weights only; its torch < 2.3 pin does not apply (see the note above dev in pyproject.toml)
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps facenet-pytorch==2.6.0
  touch "$stamp"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
job=${1:-}
shift || true
case "$job" in
  build) exec "$venv/bin/hsface" build tiny --model random-tiny "$@" ;;
  test)
    # the demo's browser test drives Debian's chromium (browser downloads of test tools need network)
    if ! command -v chromedriver >/dev/null && [[ $(id -u) == 0 ]]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    fi
    exec "$venv/bin/python" -m pytest "$@" ;;
  *) echo "usage: ./dev.sh build|test [args]" >&2; exit 2 ;;
esac
