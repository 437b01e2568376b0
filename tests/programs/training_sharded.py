"""Training under the logical-axis rules on 8 devices (see tests/parallel/test_eight_devices.py):
prints one line per check. Run by tests/programs/eight_devices.py with 8 fake CPU devices.

A script read top to bottom: each check imports what it needs where it starts.
"""
# ruff: noqa: E402
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from imagefolder_jax import parallel
from imagefolder_jax.storage.bundle import save_bundle
from imagefolder_jax.train import checkpointing, loop
from imagefolder_jax.train.configuration import load_config
from imagefolder_jax.train.generator_task import GeneratorTask
from imagefolder_jax.train.tokenizer_task import TokenizerTask


def run(configs: str, work: str) -> None:
  TOL = 1e-5
  import time

  T0 = time.time()
  def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)

  tok = TokenizerTask(load_config(os.path.join(configs, "tokenizer_tiny.py"), [
      "--config.loss.lpips=0.0", "--config.loss.semantic=0.0", "--config.loss.gan=0.0"]), load_frozen=False)
  image = np.zeros((1, 32, 32, 3), np.float32)
  bundle = os.path.join(work, "tok")
  save_bundle(bundle, *tok.export(tok.init_state(jax.random.key(0), {"image": image})))

  def task(*overrides):
    return GeneratorTask(load_config(os.path.join(configs, "generator_tiny.py"),
                                     [f"--config.tokenizer_bundle={bundle}",
                                      # no label dropout: microbatches draw it per microbatch
                                      "--config.model.label_dropout=0.0", *overrides]))

  # Pre-tokenized codes (B, P, L) skip the frozen encoder: the step is the generator's own work.
  rng = np.random.default_rng(0)
  batches = [{"codes": rng.integers(0, 64, (8, 2, 21)).astype(np.int32),
              "label": rng.integers(0, 9, (8,)).astype(np.int32)} for _ in range(3)]
  compiled = {}

  def setup(t, mesh, rules=parallel.LOGICAL_RULES):
    key = (id(t), tuple(mesh.devices.shape), mesh.devices.size, rules)
    if key not in compiled:   # one jitted step per (task, mesh): its compile is shared by every use
      abstract, shardings = loop.shardings_for(t, mesh, rules, jax.random.key(0), batches[0])
      fshard = parallel.frozen_shardings(mesh, t.frozen)
      frozen = parallel.put_global(t.frozen, fshard)
      step = loop.jit_train_step(t, mesh, rules, shardings, fshard, donate=False)
      compiled[key] = abstract, shardings, frozen, step
    return compiled[key]

  def train(t, mesh, steps=3, state=None, first=0):
    abstract, shardings, frozen, step = setup(t, mesh)
    if state is None:
      state = jax.jit(t.init_state, out_shardings=shardings)(jax.random.key(0), batches[0])
    for i in range(first, first + steps):
      with jax.set_mesh(mesh):
        state, metrics = step(state, frozen, parallel.shard_batch(mesh, batches[i % 3]))
    return state, metrics, shardings

  def rel(a, b):
    a, b = parallel.to_host(a["params"]), parallel.to_host(b["params"])
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    num = sum(float(np.sum((np.asarray(x, np.float64) - y) ** 2)) for x, y in pairs)
    den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in jax.tree.leaves(b))
    return (num / den) ** 0.5

  gen = task()
  one_mesh = parallel.make_mesh(devices=jax.devices()[:1])
  ref, ref_metrics, _ = train(gen, one_mesh)
  for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]:
    state, metrics, shardings = train(gen, parallel.make_mesh(*shape))
    err = rel(state, ref)
    log("mesh", shape, "relative error", err)
    assert err < TOL, (shape, err)
    assert abs(float(metrics["loss"]) - float(ref_metrics["loss"])) < 1e-5, shape
    if shape == (2, 2, 2):
      p, mu = state["params"], state["opt_state"][1][0].mu
      expect = {("blocks_0", "ffn", "fc1", "kernel"): P("fsdp", "tensor"),   # ('embed', 'mlp')
                ("blocks_0", "ffn", "fc2", "kernel"): P("tensor", "fsdp"),   # ('mlp', 'embed')
                ("blocks_0", "attn", "mat_qkv", "kernel"): P("fsdp", "tensor"),
                ("class_emb", "embedding"): P(None, "fsdp"),                 # (None, 'embed')
                ("pos_1LC",): P(None, None, "fsdp"),
                ("head", "kernel"): P("fsdp", "tensor"),                     # ('embed', 'vocab')
                ("blocks_0", "ada_lin", "kernel"): P("fsdp", None)}          # AdaLN modulation
      for path, spec in expect.items():
        for tree in (p, state["ema_params"], mu):
          leaf = tree
          for k in path:
            leaf = leaf[k]
          assert leaf.sharding.spec == spec, (path, leaf.sharding.spec, spec)
      # heads=2 does not divide tensor=2? it does: scale_mul (heads,) is split; the step counter is not.
      assert p["blocks_0"]["attn"]["scale_mul"].sharding.spec == P("tensor")
      assert state["step"].sharding.spec == P()
      # A config override moves the MLP off 'tensor' (mesh.rules wins over the table).
      rules = parallel.rules_from_config((("mlp", None),))
      _, s2, _, _ = setup(gen, parallel.make_mesh(2, 2, 2), rules)
      assert s2["params"]["blocks_0"]["ffn"]["fc1"]["kernel"].spec == P("fsdp", None)
  print("meshes OK", flush=True)

  # Checkpoint after 2 steps on 8 devices (2,2,2); resume on 4 devices and on 1; one more step each.
  mesh8 = parallel.make_mesh(2, 2, 2)
  state8, _, sh8 = train(gen, mesh8, steps=2)
  manager = checkpointing.make_manager(os.path.join(work, "ckpt"), keep=2, async_save=False)
  checkpointing.save(manager, 2, state8, {"data_iterators": ["{}"]})
  manager.wait_until_finished()
  cont8, _, _ = train(gen, mesh8, steps=1, state=state8, first=2)
  for mesh in (parallel.make_mesh(1, 2, 2, devices=jax.devices()[:4]), one_mesh):
    abstract, shardings, _, _ = setup(gen, mesh)
    step, restored, _ = checkpointing.restore_latest(
        checkpointing.make_manager(os.path.join(work, "ckpt"), keep=2, async_save=False),
        checkpointing.abstract_with_shardings(abstract, shardings))
    assert step == 2 and rel(restored, state8) == 0.0
    resumed, _, _ = train(gen, mesh, steps=1, state=restored, first=2)
    err = rel(resumed, cont8)
    log("resume on", mesh.devices.size, "devices: relative error", err)
    assert err < TOL, err
  print("resume OK", flush=True)

  # Remat and gradient accumulation: the same parameters (3 steps on (2,2,2) as `cont8`) ...
  mesh = mesh8
  for name, t in [("remat=full", task("--config.train.remat=full")),
                  ("grad_accum=2", task("--config.train.grad_accum=2"))]:
    state, _, _ = train(t, mesh)
    err = rel(state, cont8)
    log(name, "relative error", err)
    assert err < TOL, (name, err)

  # ... and less compiled memory (XLA's buffer assignment, compile only). Remat on a model whose
  # block activations dominate (at the tiny size XLA:CPU's fusion leaves nothing to save).
  import flax.linen as nn

  from imagefolder_jax.models.generator import GeneratorConfig, NextScaleGenerator, generator_loss

  c = GeneratorConfig(depth=4, width=128, num_heads=2, num_classes=5, codebook_size=16, latent_dim=4,
                      scales=(1, 2, 4, 6), drop_path_rate=0.0, label_dropout=0.0)
  x, l, tg = jnp.ones((32, 56, 8)), jnp.zeros((32,), jnp.int32), jnp.zeros((32, 57, 2), jnp.int32)
  def remat_temp(policy):
    m = NextScaleGenerator(c, remat=policy)
    p = nn.unbox(jax.eval_shape(m.init, jax.random.key(0), l, x))["params"]
    g = jax.jit(jax.grad(lambda p: generator_loss(m.apply({"params": p}, l, x, train=True), tg)))
    return g.lower(p).compile().memory_analysis().temp_size_in_bytes
  def accum_temp(k):
    t = task("--config.data.batch_size=64", f"--config.train.grad_accum={k}")
    batch = {"codes": jax.ShapeDtypeStruct((64, 2, 21), jnp.int32), "label": jax.ShapeDtypeStruct((64,), jnp.int32)}
    abstract, shardings, _, step = setup(t, one_mesh)
    abstract = checkpointing.abstract_with_shardings(abstract, shardings)
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), t.frozen)
    with jax.set_mesh(one_mesh):
      return step.lower(abstract, frozen, batch).compile().memory_analysis().temp_size_in_bytes
  none, full = remat_temp("none"), remat_temp("full")
  one, four = accum_temp(1), accum_temp(4)
  log("temp bytes: remat none", none, "full", full, "| grad_accum 1", one, "4", four)
  assert full < none and four < 0.5 * one, (none, full, one, four)
  print("memory OK", flush=True)

  # `plan` on (2,2,2): per-device parameter bytes equal what the trained state holds per device,
  # FLOPs are the analytic count x batch.
  from imagefolder_jax import planning
  from imagefolder_jax.planning import flops

  pl = planning.plan("generator", gen.config, {"data": 2, "fsdp": 2, "tensor": 2}, 8, "h100", pretokenized=True)
  held = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state8["params"]))
  total = sum(x.nbytes for x in jax.tree.leaves(state8["params"]))
  log("plan params bytes per device", pl.params_bytes, "held", held, "of", total)
  assert pl.params_bytes == held < total and pl.ema_bytes == held and pl.opt_state_bytes >= 2 * held
  assert pl.analytic_flops_per_step == flops.train_flops_per_example(gen, pretokenized=True)["total"] * 8
  assert pl.fits and pl.temp_bytes > 0 and pl.xla_flops_per_device > 0
  print("plan OK")
