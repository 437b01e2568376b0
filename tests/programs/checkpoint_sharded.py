"""Training checkpoints of arrays replicated over 8 devices: orbax's replica-parallel save cuts a
shard on its device only where each replica's slice reaches `REPLICA_PARALLEL_MIN_SLICE_BYTES`
(a dispatched slice per replica costs more than writing a small slice whole); the restore equals
the state saved."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from imagefolder_jax.train import checkpointing


def run(workdir: str) -> dict:
  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated = NamedSharding(mesh, P())
  per_slice = checkpointing.REPLICA_PARALLEL_MIN_SLICE_BYTES
  rows = 2 * per_slice * len(jax.devices()) // (4 * 256)   # float32 rows of 256: 2x the minimum per slice
  state = {"small": jax.device_put(jnp.arange(64.0).reshape(8, 8), replicated),
           "large": jax.device_put(jnp.arange(rows * 256, dtype=jnp.float32).reshape(rows, 256), replicated)}
  sliced = []
  original = jax.lax.slice_in_dim

  def counting_slice(operand, *args, **kwargs):
    sliced.append(operand.shape)
    return original(operand, *args, **kwargs)

  jax.lax.slice_in_dim = counting_slice
  try:
    manager = checkpointing.make_manager(workdir, keep=1, async_save=False)
    checkpointing.save(manager, 1, state, {"data_iterator": "{}"})
    manager.wait_until_finished()
  finally:
    jax.lax.slice_in_dim = original
  # One slice per replica of the large array (8 devices, all local), none of the small one.
  assert sliced == [(rows, 256)] * len(jax.devices()), sliced
  abstract = checkpointing.abstract_with_shardings(jax.eval_shape(lambda: state),
                                                   jax.tree.map(lambda _: replicated, state))
  step, restored, _ = checkpointing.restore_latest(manager, abstract, required_meta=("data_iterator",))
  assert step == 1
  for key in state:
    np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(state[key]))
  return {"slices": len(sliced), "slice_bytes": rows * 256 * 4 // len(jax.devices())}
