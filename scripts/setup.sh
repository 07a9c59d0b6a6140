#!/usr/bin/env bash
# One-time set-up of a fresh machine (idempotent; a second run takes seconds).
#  - Debian packages: the Fashion-MNIST IDX files, and SLURM + munge for the cluster-launcher tests
#  - PyTorch: torch 2.14.1 + torchvision 0.29.1 (on this kind of machine pip serves both from local disk)
#  - add-bench itself, editable, with the test extras
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  need=()
  [ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
  command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
  command -v munged >/dev/null 2>&1 || need+=(munge)
  if [ ${#need[@]} -gt 0 ]; then
    echo "setup: apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
else
  echo "setup: no root apt-get; install Debian's dataset-fashion-mnist yourself or set ADD_BENCH_FASHION_MNIST"
fi

if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "setup: pip install torch==2.14.1 torchvision==0.29.1"
  "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
# checked from outside the repository, so that the installed package (not the working directory) answers
installed=$(cd / && "$PY" -c "import add_bench, diffusers, transformers, cleanfid, open_clip, timm, submitit, nbclient, tensorboard, jupytext, ruff, xdist, os
print(os.path.realpath(os.path.dirname(add_bench.__file__)))" 2>/dev/null || true)
if [ "$installed" != "$(realpath add_bench)" ]; then
  echo "setup: pip install -e .[dev]"
  "$PY" -m pip install -q -e ".[dev]"
fi
echo "setup: ok ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
