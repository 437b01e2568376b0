"""One process of a two-process job that exercises `multihost` barriers (run by test_multihost.py).

  python barriers.py SCENARIO [SECONDS]

late:       process 1 arrives SECONDS late at a cross-process program and at the final barrier.
mismatch:   the processes wait at barriers of different names (as a process with no work would).
ended:      process 1 exits normally without reaching process 0's barrier.
blocked:    process 1 sleeps for SECONDS before its barrier: process 0 prints 'waiting' and stays
            blocked there (the test then sends SIGTERM).
collective: the same with process 0 blocked inside a cross-process device collective (compiled
            before 'waiting').
exchange:   `exchange` / `any_process` values, and a program on each process's own devices called a
            different number of times per process.
Prints 'ready' (flushed) once the job is up and 'passed' at the end; a `BarrierError` ends the
process as the CLI does (one line, exit 3).
"""
import sys
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from imagefolder_jax.parallel import multihost  # first: imports jax as the CLI does


def cross_process_sum(me: int) -> float:
  mesh = Mesh(np.array(jax.devices()), ("data",))
  step = multihost.compile_then_sync(jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P())), "sum",
                                     mesh)
  x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), np.full((2,), me + 1.0))
  return float(step(x)), float(step(x + 1))


def run(scenario: str, seconds: float, me: int) -> None:
  if scenario == "late":
    if me == 1:
      time.sleep(seconds)  # one process arrives late, as after a slow compile
    print("sum", *cross_process_sum(me), flush=True)
    if me == 1:
      time.sleep(seconds)
    multihost.sync("done")
  elif scenario == "mismatch":
    multihost.sync("sampler compiled" if me == 0 else "sample shards written")
  elif scenario == "ended":
    if me == 0:
      multihost.sync("only process 0 comes here")
  elif scenario == "blocked":
    if me == 1:
      time.sleep(seconds)
    else:
      print("waiting", flush=True)
    multihost.sync("blocked")
  elif scenario == "collective":
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), np.ones((2,)))
    total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P())).lower(x).compile()
    if me == 1:
      time.sleep(seconds)
    else:
      print("waiting", flush=True)
    print("sum", float(total(x)), flush=True)
  elif scenario == "exchange":
    assert multihost.exchange("values", f"v{me}") == ["v0", "v1"]
    assert multihost.any_process(me == 1) and not multihost.any_process(False)
    local = Mesh(np.array(jax.local_devices()), ("data",))
    double = multihost.compile_then_sync(jax.jit(lambda x: x * 2), "local", local)
    for _ in range(3 if me == 0 else 1):
      double(np.ones(2))
    multihost.sync("end")
  else:
    raise SystemExit(f"unknown scenario {scenario!r}")


def main() -> None:
  scenario = sys.argv[1]
  seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
  assert multihost.initialize_distributed()
  print("ready", flush=True)
  try:
    run(scenario, seconds, jax.process_index())
  except multihost.BarrierError as e:
    print(f"error: {e}", file=sys.stderr)
    multihost.abandon(multihost.EXIT_PEER_LOST)
  print("passed", flush=True)


if __name__ == "__main__":
  main()
