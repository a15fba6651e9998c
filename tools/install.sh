#!/usr/bin/env bash
# Install everything mofo needs on a fresh Debian/Ubuntu machine with Python 3.10+:
# PyTorch (pinned), the mofo package with its test extras, the system packages the
# integration tests use (SLURM + munge for `pytest -m slurm`, Chromium for the report test),
# and the SLURM profile linked where `snakemake --profile slurm` finds it (tools/link_profile.sh).
# Usage: bash tools/install.sh            (as root for the apt part; skipped otherwise)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# torch first and pinned: an unpinned torch would pull a newer multi-GB CUDA build.
"$PYTHON" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$PYTHON" -m pip install -q -e ".[dev]"

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    fi
    # Headless Chromium: tests/test_report.py opens the Snakemake report in it.
    if ! command -v chromium >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    fi
else
    echo "install.sh: not root (or no apt-get): skipping slurm-wlm/munge and chromium; pytest -m slurm and tests/test_report.py will skip" >&2
fi

# `snakemake --profile slurm`: link profiles/slurm into ${XDG_CONFIG_HOME:-~/.config}/snakemake/.
# A different profile already named slurm is kept (the demo and the tests do not need this one).
bash tools/link_profile.sh || echo "install.sh: SLURM profile not linked (see above); everything else is installed" >&2
