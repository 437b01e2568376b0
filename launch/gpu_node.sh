#!/usr/bin/env bash
# One GPU node, one process driving all of its GPUs (no SLURM needed):
#   launch/gpu_node.sh train-tokenizer --config configs/tokenizer_imagenet.py --workdir /ckpt/tok \
#       --config.data.data_dir=/data/tfds
#   IFJ_DRY_RUN=1 launch/gpu_node.sh sample ...     # prints what would run
# Several nodes: launch/slurm.sbatch. One process per GPU on this node: launch/local.sh 8 VERB ...
# Python: $IFJ_VENV/bin/python (default: the repository's .venv).
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 VERB [ARGS...]   (see imagefolder-jax --help)" >&2; exit 2; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/gpu_flags.sh
source "$here/launch/gpu_flags.sh"
python="${IFJ_VENV:-$here/.venv}/bin/python"
cd "$here"
if [[ "${IFJ_DRY_RUN:-0}" == 1 ]]; then
  echo "export XLA_FLAGS=$(printf '%q' "$XLA_FLAGS")"
  printf '%q ' "$python" -m imagefolder_jax.cli "$@"
  echo
  exit 0
fi
exec "$python" -m imagefolder_jax.cli "$@"
