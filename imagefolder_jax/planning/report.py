"""A plan as text: the table `imagefolder-jax plan` prints (docs/planning.md, "Reading the output")."""
from __future__ import annotations

import numpy as np

from imagefolder_jax.planning.planner import USABLE_FRACTION, Plan


def _collectives_line(collectives: dict) -> str:
  parts = [f"{kind} x{v['count']} ({_size(v['bytes'])}" + (f", {_size(v['cross_bytes'])} sent across slices/nodes"
                                                            if v.get("cross_bytes") else "") + ")"
           for kind, v in collectives.items() if isinstance(v, dict)]
  text = "; ".join(parts) or "none"
  if collectives.get("unknown_trip_counts"):
    text += f" (loops of unknown trip count counted once: {len(collectives['unknown_trip_counts'])})"
  return text


def _ms(seconds: float) -> str:
  return f"{seconds * 1e3:.1f} ms" if seconds >= 0.01 else f"{seconds * 1e3:.3f} ms"


def _size(b: float) -> str:
  for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if b >= scale:
      return f"{b / scale:.2f} {unit}"
  return f"{b:.0f} B"


def format_plan(p: Plan) -> str:
  """A human-readable table of one plan (GiB = 2^30 bytes)."""
  gib = lambda b: f"{b / 2 ** 30:8.2f} GiB"
  mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items())
  where = p.topology if p.topology else f"{p.devices} x {p.chip}"
  rows = [f"{p.stage}: {p.num_params / 1e6:.1f}M params, global batch {p.global_batch}, mesh {mesh} on {where}"
          + (f" ({p.compiler.upper()} compiler)" if p.accelerator else "")]
  rows += [f"  params          {gib(p.params_bytes)} per device (from the shardings)",
           f"  optimizer state {gib(p.opt_state_bytes)}",
           f"  EMA params      {gib(p.ema_bytes)}",
           f"  other state     {gib(p.other_state_bytes)}",
           f"  frozen networks {gib(p.frozen_bytes)}",
           f"  batch           {gib(p.batch_bytes)}"]
  if p.accelerator:
    if p.out_of_memory:
      rows.append(f"  compiled        refused: {p.out_of_memory}")
      rows.append(f"  verdict         DOES NOT FIT on {p.chip} ({gib(p.chip_memory).strip()} per chip)")
      return "\n".join(rows)
    if np.isnan(p.compiled_peak_bytes):
      rows.append("  compiled        not compiled (--no-compile): state/frozen/batch only")
    else:
      rows += [f"  compiled        arguments {gib(p.argument_bytes).strip()}, outputs {gib(p.output_bytes).strip()}, "
               f"temporaries {gib(p.temp_bytes).strip()}, aliased {gib(p.alias_bytes).strip()} per chip"]
    margin = p.memory_limit - p.peak_bytes
    rows.append(f"  peak            {gib(p.peak_bytes)} of {gib(p.memory_limit).strip()} -> "
                f"{'fits' if p.fits else 'DOES NOT FIT'} ({'margin' if margin >= 0 else 'over by'} "
                f"{gib(abs(margin)).strip()})")
    if not np.isnan(p.compiled_peak_bytes):
      kernels = (f" + {p.kernel_flops_per_device:.3e} in attention kernels" if p.kernel_flops_per_device else "")
      compiled = ("" if np.isnan(p.xla_flops_per_device) else
                  f"; compiled {p.xla_flops_per_device:.3e} per chip{kernels} x {p.devices} = "
                  f"{(p.xla_flops_per_device + p.kernel_flops_per_device) * p.devices:.3e}")
      rows.append(f"  FLOPs/step      analytic {p.analytic_flops_per_step:.3e}{compiled}")
      if p.kernel_bytes_per_device:
        rows.append(f"  HBM bytes/step  {p.bytes_accessed:.3e} per chip by the cost model + "
                    f"{p.kernel_bytes_per_device:.3e} in Pallas kernels (their operands and results; the cost "
                    "model prices a kernel at 0)")
      if p.vector_ops_per_device:
        rows.append(f"  vector ops      {p.vector_ops_per_device:.3e} per chip in the top-k/top-p kernel (searches on "
                    "chip: the vector units' time, which the roofline does not hold)")
      if p.loop_scale:
        scale = p.loop_scale
        rows.append(f"  loops           the cost model prices a while body once: its FLOPs x{scale['flops']:.2f} and "
                    f"HBM bytes x{scale['bytes']:.2f} for the trip counts in the step time")
      rows.append(f"  collectives     {_collectives_line(p.collectives)}")
      r = p.roofline
      memory = "" if r.get("memory_seconds") is None else f", HBM {_ms(r['memory_seconds'])}"
      rows.append(f"  step time       roofline {_ms(r['seconds'])} (compute {_ms(r['compute_seconds'])}"
                  f"{memory}, ICI {_ms(r['ici_seconds'])}, DCN {_ms(r['dcn_seconds'])}): "
                  f"{p.images_per_second:,.0f} images/s, MFU {p.implied_mfu:.0%} (a model of the compiled program, "
                  "not a measurement)")
      if p.stage == "sampler":
        matmul_bound = p.analytic_flops_per_step / (p.devices * p.peak_flops)
        rows.append(f"  per image       {_ms(p.step_seconds / p.global_batch)} by the roofline; the matmul-FLOP "
                    f"roofline (analytic FLOPs / chips x peak) gives {_ms(matmul_bound / p.global_batch)} "
                    f"({p.step_seconds / matmul_bound:.1f}x)")
      rows.append("  cost model      " + (f"optimal_seconds {_ms(p.optimal_seconds)}"
                                         if p.optimal_seconds is not None else "no valid time")
                  + (f" ({p.optimal_note})" if p.optimal_note else ""))
      for warning in p.compiler_warnings:
        rows.append(f"  warning         {warning}")
      if p.compiler == "gpu":
        from imagefolder_jax.models.layers import cudnn_attention_available
        if not cudnn_attention_available():
          rows.append("  note            attention compiled as XLA's: cuDNN's fused attention needs cuDNN and a GPU "
                      "to trace (a bf16 run on the node uses it, with less memory)")
      if p.compiler_options:
        rows.append("  note            compiled with xla_gpu_enable_triton_gemm=false: a deviceless compile cannot "
                    "autotune Triton's GEMM tiles")
    return "\n".join(rows)
  compiled = not np.isnan(p.temp_bytes)
  rows += [
      (f"  temporaries     {gib(p.temp_bytes)} (XLA:CPU's buffer assignment on fake devices: not what a GPU or TPU "
       "needs; use --topology)" if compiled else "  temporaries     not compiled (--no-compile): unknown"),
      f"  peak            {gib(p.peak_bytes)} of {gib(p.chip_memory)} -> "
      f"{'fits' if p.fits else 'DOES NOT FIT'} (limit {USABLE_FRACTION:.0%}"
      f"{'' if compiled else ', state/frozen/batch only'})",
      f"  FLOPs/step      analytic {p.analytic_flops_per_step:.3e}" +
      (f"; compiled {p.xla_flops_per_device:.3e} per device x {p.devices} = "
       f"{p.xla_flops_per_device * p.devices:.3e} (cost_analysis)" if compiled else ""),
      f"  at MFU {p.mfu:.0%} of {p.peak_flops / 1e12:.1f} TFLOP/s per device: {p.step_seconds:.3f} s/step, "
      f"{p.images_per_second:,.0f} images/s (estimate, not a measurement)",
  ]
  return "\n".join(rows)
