#!/usr/bin/env bash
# Train on one GPU node, or on several under SLURM (one process per node; JAX sees every local GPU).
#   launch/gpu_node.sh train-tokenizer --config configs/tokenizer_imagenet.py --workdir /ckpt/tok --config.data.data_dir=/data/tfds
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_node.sh train-generator ...
# Under SLURM, imagefolder-jax calls jax.distributed.initialize() itself (SLURM_JOB_ID is set).
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
# Latency-hiding scheduler overlaps FSDP all-gathers with compute.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
if [[ -n "${SLURM_JOB_ID:-}" && "${SLURM_NTASKS:-1}" -gt 1 ]]; then
  exec srun --kill-on-bad-exit=1 .venv/bin/imagefolder-jax "$@"
fi
exec .venv/bin/imagefolder-jax "$@"
