"""Will it fit, and how fast: plans of a training step or the sampler before renting the devices.

  flops.py     analytic model FLOPs (training steps, sampling) and MFU; training's progress lines use it
  topology.py  accelerator topologies by name, compile-only TPU / GPU devices
  chips.py     what one chip can do (peak FLOP/s, memory, bandwidths)
  planner.py   compile the real train step for a mesh of them; memory, FLOPs, collectives, roofline
  sampler.py   the same for `Generator.sample`'s program
  report.py    a plan as the text `plan` prints
  hlo.py       reading the compiled program: collectives, custom calls the cost model cannot price

The planner's names are loaded on first use: training imports `planning.flops` alone, and the planner
imports training.
"""
import importlib

_LAZY = {
    "CHIP_SPECS": ("chips", "CHIPS"), "ChipSpec": ("chips", "ChipSpec"), "PlanError": ("errors", "PlanError"),
    "CHIP_MEMORY": ("planner", "CHIP_MEMORY"), "CHIPS": ("planner", "CHIPS"),
    "USABLE_FRACTION": ("planner", "USABLE_FRACTION"), "Plan": ("planner", "Plan"),
    "chip_peak_and_memory": ("planner", "chip_peak_and_memory"), "format_plan": ("report", "format_plan"),
    "make_task": ("planner", "make_task"), "parse_mesh": ("planner", "parse_mesh"), "plan": ("planner", "plan"),
    "Topology": ("topology", "Topology"), "compile_only_devices": ("topology", "compile_only_devices"),
    "parse_topology": ("topology", "parse_topology"),
}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    module, attribute = _LAZY[name]
    return getattr(importlib.import_module(f"imagefolder_jax.planning.{module}"), attribute)
  raise AttributeError(f"module 'imagefolder_jax.planning' has no attribute {name!r}")
