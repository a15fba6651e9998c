#!/usr/bin/env bash
# Install a one-node SLURM (slurm-wlm 22.05 on Debian 12) and munge for the `slurm` tests.
# Idempotent: does nothing when slurmctld, slurmd, sbatch and munged are already there.
# Needs root (the tests start the daemons as root). Usage: bash tests/cluster/install_slurm.sh
set -euo pipefail

have_all() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v squeue >/dev/null \
        && { command -v munged >/dev/null || [ -x /usr/sbin/munged ]; }
}

if have_all; then
    echo "install_slurm: slurm and munge already installed"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install_slurm: needs root (apt-get)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# slurm-wlm pulls slurmctld, slurmd and slurm-client; munge authenticates the daemons.
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
# The munge package normally creates the key; make sure one exists (the tests need it).
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        create-munge-key -f
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
have_all
echo "install_slurm: installed slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm)"
