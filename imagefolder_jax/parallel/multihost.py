"""Multi-process jobs: joining one (`initialize_distributed`), noticing a dead peer (`Watchdog`),
barriers (`sync`, `compile_then_sync`) and who speaks for the job (`is_primary`).

One process per host (TPU pods, GPU nodes under SLURM) or per group of local devices
(`launch/local.sh`) runs the same command; process 0 hosts jax's coordination service. Sharding and
host <-> device transfers are in `parallel`.
"""
from __future__ import annotations

import atexit
import itertools
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

import jax
import numpy as np

from imagefolder_jax.errors import ImageFolderError

# Environment variables read by `initialize_distributed` (launch/local.sh sets the first three).
ENV_COORDINATOR = "IFJ_COORDINATOR"        # host:port of process 0's coordination service
ENV_NUM_PROCESSES = "IFJ_NUM_PROCESSES"
ENV_PROCESS_ID = "IFJ_PROCESS_ID"
ENV_TIMEOUTS = {"initialization_timeout": "IFJ_INIT_TIMEOUT",        # s to wait for all processes
                "heartbeat_timeout_seconds": "IFJ_HEARTBEAT_TIMEOUT",  # s without a heartbeat = dead
                "shutdown_timeout_seconds": "IFJ_SHUTDOWN_TIMEOUT"}    # s to wait for all at exit
# Our defaults (seconds). A process not heard from for `heartbeat_timeout_seconds` is declared dead
# by our watchdog (one line, exit code EXIT_PEER_LOST); jax's own heartbeat check, which aborts
# with a C++ stack trace, is set to twice that as a backstop. 60 s notices a dead host well before
# jax's 100 s default and is far above any pause of a healthy process (heartbeats run on their own
# thread, also while the main thread waits in a collective or compiles).
DEFAULT_TIMEOUTS = {"initialization_timeout": 300, "heartbeat_timeout_seconds": 60,
                    "shutdown_timeout_seconds": 120}
EXIT_PEER_LOST = 3
# Seconds a process waits at a barrier (`sync`) for the others: long enough for a peer writing a
# checkpoint or compiling a large program; a dead peer is noticed sooner by the heartbeat.
ENV_BARRIER_TIMEOUT = "IFJ_BARRIER_TIMEOUT"
DEFAULT_BARRIER_TIMEOUT = 1800


class DistributedError(ImageFolderError):
  """Multi-process setup is inconsistent (bad coordinator, process id out of range, ...)."""


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedError(f"{name}={value!r} is not an integer") from None


def initialize_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, **timeouts: int) -> bool:
  """Starts multi-process JAX when this is one of several processes; a no-op otherwise.

  Must run before any other JAX call touches the devices. Explicit arguments win over the
  environment: `IFJ_COORDINATOR` / `IFJ_NUM_PROCESSES` / `IFJ_PROCESS_ID` (or jax's own
  `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`), as `launch/local.sh` sets them;
  otherwise `IFJ_DISTRIBUTED=1` (launch/tpu_pod.sh) or a SLURM job with several tasks lets jax detect
  the cluster itself. Timeouts (seconds): `initialization_timeout` (all processes must connect
  within it), `heartbeat_timeout_seconds` (a process silent that long is declared dead and every
  other process stops), `shutdown_timeout_seconds`; defaults in `DEFAULT_TIMEOUTS`, overridable by
  the `IFJ_*_TIMEOUT` variables. Returns True when several processes are running.
  """
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None:
    num_processes = _env_int(ENV_NUM_PROCESSES) or _env_int("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int(ENV_PROCESS_ID)
    process_id = _env_int("JAX_PROCESS_ID") if process_id is None else process_id
  options = dict(DEFAULT_TIMEOUTS)
  for key, env in ENV_TIMEOUTS.items():
    if _env_int(env) is not None:
      options[key] = _env_int(env)
  for key, value in timeouts.items():
    if key not in DEFAULT_TIMEOUTS:
      raise TypeError(f"unknown timeout {key!r}; expected one of {sorted(DEFAULT_TIMEOUTS)}")
    options[key] = int(value)
  for key, value in options.items():
    if value < 1:
      raise DistributedError(f"{key} must be >= 1 second, got {value}")

  if coordinator:
    if num_processes is None or process_id is None:
      raise DistributedError(f"coordinator {coordinator} given without the number of processes and this "
                             f"process's id ({ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise DistributedError(f"process id {process_id} is outside [0, {num_processes})")
    if ":" not in coordinator:
      raise DistributedError(f"coordinator must be host:port, got {coordinator!r}")
    if num_processes == 1:
      return False
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                               **_jax_options(options))
  elif os.environ.get("IFJ_DISTRIBUTED") == "1" or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize(**_jax_options(options))
  else:
    return False
  if jax.process_count() > 1:
    Watchdog(options["heartbeat_timeout_seconds"]).start()
    exit_on_signals()
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def _jax_options(options: dict) -> dict:
  out = dict(options)
  timeout = options["heartbeat_timeout_seconds"]
  out["heartbeat_timeout_seconds"] = timeout + max(timeout, 10)
  return out


class Watchdog(threading.Thread):
  """Notices a dead or hung process and stops this one with one line instead of a hang.

  Every `timeout / 5` seconds each process bumps its counter `ifj/alive/<id>` in the coordination
  service's key-value store and reads the others'. A process whose counter has not moved for
  `timeout` seconds (killed, crashed, hung, its host gone), or a coordinator that stops answering
  for that long (process 0 died), ends this process with `EXIT_PEER_LOST` after one line on stderr.
  A process that finished normally marks itself done first (atexit), so stragglers are not blamed.
  """

  def __init__(self, timeout: float):
    super().__init__(name="ifj-watchdog", daemon=True)
    from jax._src import distributed
    self.client = distributed.global_state.client
    self.timeout = float(timeout)
    self.interval = max(self.timeout / 5.0, 0.2)
    self.me, self.count = jax.process_index(), jax.process_count()
    self._stop = threading.Event()
    atexit.register(self.finish)

  def finish(self) -> None:
    if self._stop.is_set():
      return
    self._stop.set()
    _mark_ended("1")

  def _die(self, message: str) -> None:
    if self._stop.is_set():
      return
    sys.stderr.write(f"imagefolder-jax: error: {message}; stopping process {self.me} "
                     f"(exit {EXIT_PEER_LOST}). Rerun the same command on every host to resume from "
                     "the last checkpoint\n")
    sys.stderr.flush()
    os._exit(EXIT_PEER_LOST)

  def run(self) -> None:
    now = time.monotonic()
    seen = {q: (None, now) for q in range(self.count) if q != self.me}
    last_ok, beat = now, 0
    while not self._stop.wait(self.interval):
      now = time.monotonic()
      try:
        beat += 1
        self.client.key_value_set(f"ifj/alive/{self.me}", str(beat), allow_overwrite=True)
        for q, (value, since) in list(seen.items()):
          if _try_get(self.client, f"{_DONE_PREFIX}/{q}") == "1":
            del seen[q]
            continue
          current = _try_get(self.client, f"ifj/alive/{q}")
          if current != value:
            seen[q] = (current, now)
          elif now - since > self.timeout:
            self._die(f"process {q} has not been heard from for {self.timeout:.0f} s (dead or hung)")
        last_ok = now
      except Exception as e:  # pylint: disable=broad-except
        if now - last_ok > self.timeout:
          self._die(f"lost the coordinator (process 0) for {self.timeout:.0f} s "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")


def _try_get(client, key: str):
  try:
    return client.key_value_try_get(key)
  except Exception as e:  # pylint: disable=broad-except
    if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
      return None
    raise


def is_multiprocess() -> bool:
  return jax.distributed.is_initialized() and jax.process_count() > 1


def peer_failure(error: BaseException) -> Optional[str]:
  """A one-line description when `error` is a collective that failed because another process of
  the job died (gloo/NCCL connection closed, coordination service unavailable); else None."""
  text = str(error)
  markers = ("Gloo", "Connection closed", "Connection reset", "heartbeat", "UNAVAILABLE", "NCCL",
             "coordination service", "DEADLINE_EXCEEDED")
  if is_multiprocess() and any(m in text for m in markers):
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return f"another process of the job failed during a collective ({first[:160]})"
  return None


def abandon(code: int) -> None:
  """Ends a failed multi-process run now. A normal exit would wait in jax's shutdown barrier for
  peers that are gone (and then abort with a stack trace), so flush and leave at once."""
  _mark_ended(f"failed {code}")
  sys.stdout.flush()
  sys.stderr.flush()
  _let_peers_leave_first()
  os._exit(code)


def _mark_ended(state: str) -> None:
  """Tells the other processes that this one is leaving (`exchange` stops waiting for it)."""
  try:
    client = _client()
    if client is not None:
      client.key_value_set(f"{_DONE_PREFIX}/{jax.process_index()}", state, allow_overwrite=True)
  except Exception:  # pylint: disable=broad-except  # the coordinator may be gone already
    pass


# Seconds process 0 (which hosts the coordination service) waits, when it leaves early, for the other
# processes to leave too: a peer whose coordinator vanishes under it is aborted by jax's client with
# a C++ stack trace instead of its own one line.
PEER_LEAVE_WAIT = 3.0


def _let_peers_leave_first() -> None:
  try:
    client = _client()
    if client is None or jax.process_index() != 0:
      return
    deadline = time.monotonic() + PEER_LEAVE_WAIT
    while time.monotonic() < deadline:
      if all(_try_get(client, f"{_DONE_PREFIX}/{q}") is not None for q in range(1, jax.process_count())):
        return
      time.sleep(0.05)
  except Exception:  # pylint: disable=broad-except  # leaving anyway
    pass


_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_signal_exit = threading.Lock()


def exit_on_signals() -> None:
  """SIGTERM and SIGINT end this process within a moment, with one line and exit code 128 + signal
  (143, 130), also while its main thread waits in a barrier, a collective or a compile.

  jax's coordination service installs a SIGTERM handler (its preemption notice) that swallows the
  signal, and a Python handler alone runs only when the main thread returns to the interpreter,
  which a process blocked in C++ never does. So the handlers are Python's, and a thread that reads
  their wake-up pipe (written from the C signal handler itself) does the exit. Must run on the main
  thread; launch/local.sh, `scancel` and Ctrl-C then end a job promptly.
  """
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  for signum in _SIGNALS:
    signal.signal(signum, lambda signum, _frame: _exit_by_signal(signum))

  def watch():
    while True:
      data = os.read(read_fd, 64)
      for signum in data:
        if signum in _SIGNALS:
          _exit_by_signal(signum)

  threading.Thread(target=watch, name="ifj-signals", daemon=True).start()


def _exit_by_signal(signum: int) -> None:
  if not _signal_exit.acquire(blocking=False):
    return
  code = 128 + int(signum)
  sys.stderr.write(f"imagefolder-jax: stopped by {signal.Signals(signum).name} (process {jax.process_index()}, "
                   f"exit {code})\n")
  abandon(code)


def is_primary() -> bool:
  """True on process 0, the one that writes logs, metrics, PNG grids and single-file outputs."""
  return jax.process_index() == 0


_barrier_numbers = itertools.count()
# Key-value store layout of `exchange`: ifj/sync/<number>/<process> = "<name>\n<value>".
_SYNC_PREFIX = "ifj/sync"
_DONE_PREFIX = "ifj/done"


class BarrierError(RuntimeError):
  """The processes of a job did not meet at the same barrier (different paths, a peer gone, or the
  barrier timeout passed)."""


def _client():
  from jax._src import distributed  # the coordination-service client; jax has no public handle
  return distributed.global_state.client


def sync(name: str) -> None:
  """Barrier across processes (no-op on one process), held by jax's coordination service.

  Not a device collective: XLA:CPU's gloo collectives give up when one process reaches a new
  collective more than a minute after another (a fixed rendezvous timeout), which a peer still
  writing a checkpoint or compiling can exceed; this waits up to `IFJ_BARRIER_TIMEOUT` seconds
  (default 1800). Every process must pass the same barriers in the same order: a process that
  meets a peer at a barrier of another name, or whose peer ended without coming, raises
  `BarrierError` (one line naming both) instead of waiting.
  """
  exchange(name, "")


def exchange(name: str, value: str) -> list[str]:
  """Barrier `name` that also hands every process's `value` (a short string) to every process:
  returns the values in process order. One process: [value]. See `sync` for the guarantees."""
  if jax.process_count() == 1:
    return [value]
  client = _client()
  if client is None:  # processes jax detected without a coordination client: a collective will do
    texts = [b.decode() for b in allgather_bytes(f"{name}\n{value}".encode())]
    return [_check_name(name, t, q) for q, t in enumerate(texts)]
  number = next(_barrier_numbers)
  me, count = jax.process_index(), jax.process_count()
  client.key_value_set(f"{_SYNC_PREFIX}/{number}/{me}", f"{name}\n{value}", allow_overwrite=True)
  timeout_s = _env_int(ENV_BARRIER_TIMEOUT) or DEFAULT_BARRIER_TIMEOUT
  start = time.monotonic()
  pause = 0.005
  while True:
    found = {int(key.rsplit("/", 1)[1]): text
             for key, text in client.key_value_dir_get(f"{_SYNC_PREFIX}/{number}/")}
    values = [_check_name(name, found[q], q) if q in found else None for q in range(count)]
    missing = [q for q in range(count) if values[q] is None]
    if not missing:
      break
    for q in missing:
      ended = _try_get(client, f"{_DONE_PREFIX}/{q}")
      if ended is not None:
        raise BarrierError(f"process {q} {'ended' if ended == '1' else 'failed'} without reaching barrier "
                           f"{name!r} (process {me} waits there)")
    if time.monotonic() - start > timeout_s:
      raise BarrierError(f"barrier {name!r}: process(es) {', '.join(map(str, missing))} did not arrive within "
                         f"{timeout_s} s ({ENV_BARRIER_TIMEOUT})")
    time.sleep(pause)
    pause = min(pause * 1.5, 0.25)
  if number > 0:  # every process has left barrier number-1 (they all reached this one): free its key
    try:
      client.key_value_delete(f"{_SYNC_PREFIX}/{number - 1}/{me}")
    except Exception:  # pylint: disable=broad-except  # a leftover key costs a few bytes
      pass
  return values


def allgather_bytes(data: bytes) -> list[bytes]:
  """Every process's `data`, in process order, on every process (a collective)."""
  if jax.process_count() == 1:
    return [data]
  from jax.experimental import multihost_utils
  lengths = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int64)))
  longest = int(lengths.max())
  buffer = np.zeros((longest,), np.uint8)
  buffer[:len(data)] = np.frombuffer(data, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(buffer))
  return [gathered[i, :int(n)].tobytes() for i, n in enumerate(lengths.reshape(-1))]


def _check_name(name: str, text: str, process: int) -> str:
  theirs, _, value = text.partition("\n")
  if theirs != name:
    raise BarrierError(f"process {process} is at barrier {theirs!r} while process {jax.process_index()} is at "
                       f"{name!r}: the processes took different paths")
  return value


def spans_processes(mesh) -> bool:
  """True when `mesh` (a jax Mesh, or None for this process's default device) holds devices of
  more than one process, i.e. its programs have collectives across processes."""
  if mesh is None:
    return False
  return len({d.process_index for d in np.asarray(mesh.devices).flat}) > 1


def compile_then_sync(jitted: Callable, name: str, mesh=None) -> Callable:
  """`jitted` (a `jax.jit` function over `mesh`) that, when `mesh` spans several processes, compiles
  ahead of time at its first call and passes a `sync` barrier before running.

  A program's first collective opens the gloo rendezvous that XLA:CPU abandons after one minute; on
  a loaded machine one process can finish compiling minutes after another. Later calls go straight
  to `jitted` (the ahead-of-time compile fills its cache; the communicators then exist). A program
  on one process's own devices (mesh None or local: per-process sampling, pretokenize) has no
  cross-process collective and is returned unchanged: its processes may call it different numbers
  of times, so a barrier there could never be met.
  """
  if jax.process_count() == 1 or not spans_processes(mesh):
    return jitted
  first_call = True

  def run(*args):
    nonlocal first_call
    if first_call:
      jitted.lower(*args).compile()
      sync(f"{name} compiled")
      first_call = False
    return jitted(*args)

  return run


def any_process(flag: bool, name: str = "any_process") -> bool:
  """True on every process when `flag` is true on any of them (a barrier named `name`, through the
  coordination service like `sync`; plain `flag` on one process)."""
  return any(v == "1" for v in exchange(name, "1" if flag else "0"))
