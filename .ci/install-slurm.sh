#!/usr/bin/env bash
# Install Debian/Ubuntu's SLURM and munge so the integration tests in tests/test_slurm_cluster.py
# can start a private single-node cluster. Packages only: the test fixture starts and stops its own
# daemons with its own configuration, so nothing here is enabled or started.
# Works as root or through sudo; exits 0 (with a message) when neither is available, so the suite
# still runs and those tests skip with the reason.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/usr/local/sbin:/sbin"  # daemons live in sbin

if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
   && command -v munged >/dev/null; then
  echo "install-slurm: slurm and munge already installed"
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "install-slurm: neither root nor password-less sudo; SLURM tests will skip" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install-slurm: no apt-get on this machine; SLURM tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
echo "install-slurm: installed $(dpkg-query -W -f '${Package} ${Version}, ' slurm-wlm slurmctld slurmd munge)"
