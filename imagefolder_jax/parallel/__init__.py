"""Running on many devices and many processes.

  sharding.py   one device mesh with named axes, logical-axis rules, shardings, host <-> global arrays
  multihost.py  the processes of a job: start-up, named barriers, lost peers, signals

The package namespace holds both, so `from imagefolder_jax import parallel` gives a caller everything
(`parallel.make_mesh`, `parallel.sync`, ...).
"""
from imagefolder_jax.parallel.multihost import (
    BarrierError,
    DistributedError,
    allgather_bytes,
    any_process,
    compile_then_sync,
    exchange,
    initialize_distributed,
    is_primary,
    spans_processes,
    sync,
)
from imagefolder_jax.parallel.sharding import (
    BATCH_AXES,
    FROZEN_REPLICATE_BELOW_MB,
    LOGICAL_RULES,
    MESH_AXES,
    MESH_KEYS,
    Mesh,
    MeshConfigError,
    NamedSharding,
    P,
    batch_sharding,
    fit_spec,
    frozen_shardings,
    global_from_full,
    host_to_global,
    local_mesh,
    local_rows,
    logical_shardings,
    make_mesh,
    mesh_from_config,
    process_rows,
    put_global,
    replicated,
    rules_from_config,
    shard_batch,
    state_shardings,
    to_host,
    traced_batch_spec,
)

__all__ = [
    "BATCH_AXES", "BarrierError", "DistributedError", "FROZEN_REPLICATE_BELOW_MB", "LOGICAL_RULES", "MESH_AXES",
    "MESH_KEYS", "Mesh", "MeshConfigError", "NamedSharding", "P", "allgather_bytes", "any_process",
    "batch_sharding", "compile_then_sync", "exchange", "fit_spec", "frozen_shardings", "global_from_full",
    "host_to_global", "initialize_distributed", "is_primary", "local_mesh", "local_rows", "logical_shardings",
    "make_mesh", "mesh_from_config", "process_rows", "put_global", "replicated", "rules_from_config",
    "shard_batch", "spans_processes", "state_shardings", "sync", "to_host", "traced_batch_spec"]
