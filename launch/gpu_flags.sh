# shellcheck shell=bash
# Sourced by launch/slurm.sbatch and launch/gpu_node.sh: XLA flags of the usual large-scale GPU
# recipes, each checked against XLA's flag table by tests/cli/test_launchers.py.
ifj_gpu_xla_flags=(
  # Overlap FSDP all-gathers and gradient reduce-scatters with compute instead of running them alone.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Fuse small collectives into large ones (128 MiB): fewer, bandwidth-bound NCCL calls.
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
  # Start the next layer's collectives inside the current loop iteration (pipelined collectives).
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  # Collectives on a high-priority stream, so compute kernels do not starve them.
  --xla_gpu_enable_highest_priority_async_stream=true
)
export XLA_FLAGS="${XLA_FLAGS:-} ${ifj_gpu_xla_flags[*]} ${IFJ_EXTRA_XLA_FLAGS:-}"
# Preallocate most of each GPU for XLA; leave room for NCCL buffers and cuDNN workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
# NCCL warnings (e.g. a fall-back from InfiniBand to sockets) go to the job log.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
