"""Will it fit, and how fast: plans of a training step before renting the devices.

  topology.py  accelerator topologies by name, compile-only TPU / GPU devices
  chips.py     what one chip can do (peak FLOP/s, memory, bandwidths)
  planner.py   compile the real train step for a mesh of them; memory, FLOPs, collectives, roofline
  hlo.py       reading the compiled program: collectives, custom calls the cost model cannot price
"""
from imagefolder_jax.planning.chips import CHIPS as CHIP_SPECS, ChipSpec
from imagefolder_jax.planning.errors import PlanError
from imagefolder_jax.planning.planner import (CHIP_MEMORY, CHIPS, USABLE_FRACTION, Plan, chip_peak_and_memory,
                                           format_plan, make_task, parse_mesh, plan)
from imagefolder_jax.planning.topology import Topology, compile_only_devices, parse_topology

__all__ = ["CHIP_MEMORY", "CHIP_SPECS", "CHIPS", "ChipSpec", "Plan", "PlanError", "Topology", "USABLE_FRACTION",
           "chip_peak_and_memory", "compile_only_devices", "format_plan", "make_task", "parse_mesh",
           "parse_topology", "plan"]
