"""Multi-host start-up on JAX's own runtime (`jax.distributed.initialize`), and helpers.

Call `initialize(...)` first thing in a CLI (the train command passes its flags), before any other
JAX call. Where the processes come from:
  - TPU pod slice (a TPU VM with chips) or `MLM_VS_CLM_DISTRIBUTED=auto`: JAX detects the
    coordinator, the process count and the process id itself.
  - SLURM (`SLURM_JOB_ID` set and `SLURM_NTASKS` > 1, inside `srun`): detected by JAX too.
  - Otherwise explicit: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`,
    or the environment variables `MLM_VS_CLM_COORDINATOR`, `MLM_VS_CLM_NUM_PROCESSES`,
    `MLM_VS_CLM_PROCESS_ID`. One process (the default) initialises nothing.

Never hang: a process that cannot reach the coordinator (or whose peers never register)
exits with one clear line after the initialisation timeout; a peer that dies later is noticed
by the coordination service's heartbeat (`heartbeat_timeout_s`), which terminates the
survivors; a collective that waits longer than `collective_timeout_s` (XLA's CPU and GPU
collective timeouts, set through XLA_FLAGS before the backend starts) fails the step.

Other environment variables:
  MLM_VS_CLM_CPU_DEVICES=N         N virtual CPU devices per process (`jax_num_cpu_devices`).
  MLM_VS_CLM_DISTRIBUTED=auto|off  force JAX's cluster auto-detection, or single process.
  MLM_VS_CLM_INIT_TIMEOUT_S, MLM_VS_CLM_COLLECTIVE_TIMEOUT_S  defaults of the two timeouts.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading

import jax
from jax._src import distributed as jax_distributed
from jax._src import xla_bridge
from jax.experimental import multihost_utils

from mlm_vs_clm.cache import cache_dir

ENV_COORDINATOR = "MLM_VS_CLM_COORDINATOR"
ENV_NUM_PROCESSES = "MLM_VS_CLM_NUM_PROCESSES"
ENV_PROCESS_ID = "MLM_VS_CLM_PROCESS_ID"
ENV_CPU_DEVICES = "MLM_VS_CLM_CPU_DEVICES"
ENV_MODE = "MLM_VS_CLM_DISTRIBUTED"
ENV_INIT_TIMEOUT = "MLM_VS_CLM_INIT_TIMEOUT_S"
ENV_COLLECTIVE_TIMEOUT = "MLM_VS_CLM_COLLECTIVE_TIMEOUT_S"

# XLA options (seconds) that bound how long a collective waits for its peers. Checked to be
# accepted by the jaxlib we pin; the CPU ones were measured to fail a stuck gloo all-reduce.
_COLLECTIVE_TIMEOUT_FLAGS = (
    "xla_cpu_collective_timeout_seconds",
    "xla_cpu_collective_call_terminate_timeout_seconds",
    "xla_gpu_first_collective_call_terminate_timeout_seconds",
    "xla_gpu_nccl_termination_timeout_seconds",
)
# JAX aborts the process itself (with a misleading "another task died" stack trace) a few
# seconds after its own deadline; our watchdog fires first and says what happened.
_JAX_DEADLINE_MARGIN_S = 30

_barrier_counter = itertools.count()


class DistributedError(RuntimeError):
    """A bad multi-process setting; the message names the cause."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"distributed: environment variable {name}={value!r} is not an integer") from None


def _backend_started() -> bool:
    return xla_bridge.backends_are_initialized()


def _on_tpu_vm() -> bool:
    try:  # a private module that may move between jax releases: looked up when needed
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # noqa: BLE001 - detection is best effort; the explicit paths remain
        return False


def _under_slurm() -> bool:
    return "SLURM_JOB_ID" in os.environ and (_env_int("SLURM_NTASKS") or 1) > 1


def _set_collective_timeout(seconds: int) -> None:
    if _backend_started():
        raise DistributedError("distributed: the collective timeout must be set before the first JAX computation")
    extra = " ".join(f"--{name}={int(seconds)}" for name in _COLLECTIVE_TIMEOUT_FLAGS)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {extra}".strip()


def configure_cpu_devices(num_devices: int | None = None) -> None:
    """`num_devices` (default: $MLM_VS_CLM_CPU_DEVICES) virtual CPU devices in this process."""
    num_devices = num_devices if num_devices is not None else _env_int(ENV_CPU_DEVICES)
    if num_devices is None:
        return
    if num_devices < 1:
        raise DistributedError(f"distributed: {ENV_CPU_DEVICES} must be >= 1, got {num_devices}")
    if _backend_started():
        raise DistributedError(f"distributed: {ENV_CPU_DEVICES} must be applied before the first JAX computation")
    jax.config.update("jax_num_cpu_devices", num_devices)


def _connect(kwargs: dict, timeout_s: int, where: str) -> None:
    """jax.distributed.initialize, with a watchdog that turns a wait past `timeout_s` into an exit."""

    def give_up():
        sys.stderr.write(
            f"distributed: {where} could not reach the coordinator or its peers within {timeout_s} s; "
            "check the coordinator address/port, the process count and that every process was started\n"
        )
        sys.stderr.flush()
        os._exit(1)  # the connecting thread is blocked inside JAX's runtime: exit from here

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=timeout_s + _JAX_DEADLINE_MARGIN_S)
    except Exception as e:  # one clear line instead of a runtime traceback
        watchdog.cancel()
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SystemExit(f"distributed: {where} failed to initialise: {first_line}") from e
    watchdog.cancel()


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int | None = None,
    *,
    heartbeat_timeout_s: int = 100,
    shutdown_timeout_s: int | None = None,
    collective_timeout_s: int | None = None,
) -> None:
    """Join the multi-process run this process belongs to; a no-op for a single process.

    Must run before any other JAX call. Unset arguments fall back to the MLM_VS_CLM_*
    environment variables. Exits the process (SystemExit, one line) if the coordinator or a
    peer cannot be reached within `timeout_s` seconds (default 300).
    """
    timeout_s = timeout_s or _env_int(ENV_INIT_TIMEOUT) or 300
    collective_timeout_s = collective_timeout_s or _env_int(ENV_COLLECTIVE_TIMEOUT)
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    mode = os.environ.get(ENV_MODE, "").strip().lower()
    if mode not in ("", "auto", "off"):
        raise DistributedError(f"distributed: {ENV_MODE} must be 'auto' or 'off', got {mode!r}")
    if jax.distributed.is_initialized():
        raise DistributedError("distributed: initialize() was already called in this process")

    configure_cpu_devices()
    if collective_timeout_s:
        _set_collective_timeout(collective_timeout_s)
    timeouts = {"heartbeat_timeout_seconds": heartbeat_timeout_s,
                "shutdown_timeout_seconds": shutdown_timeout_s or timeout_s}

    explicit = coordinator_address is not None or (num_processes or 1) > 1
    if mode == "off" or (not explicit and mode != "auto" and not _under_slurm() and not _on_tpu_vm()):
        return  # one process: nothing to join
    if explicit:
        if not coordinator_address or num_processes is None or process_id is None:
            raise DistributedError(
                "distributed: a multi-process run needs all of --coordinator_address, --num_processes and "
                f"--process_id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); got "
                f"{coordinator_address!r}, {num_processes!r}, {process_id!r}"
            )
        if ":" not in coordinator_address:
            raise DistributedError(f"distributed: coordinator address {coordinator_address!r} is not HOST:PORT")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedError(
                f"distributed: need 0 <= process_id < num_processes, got {process_id} and {num_processes}"
            )
        if num_processes == 1:
            return
        where = f"process {process_id} of {num_processes} (coordinator {coordinator_address})"
        _connect(
            dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
                 **timeouts),
            timeout_s,
            where,
        )
        return
    # A cluster JAX knows (SLURM, TPU pod slice): it detects every setting itself.
    where = f"SLURM task {os.environ['SLURM_PROCID']}" if "SLURM_PROCID" in os.environ else "this host"
    _connect(timeouts, timeout_s, where)


def enable_compilation_cache() -> str:
    """JAX's persistent compilation cache for the command-line tools: a rerun, a resume or the
    next run of a sweep with the same shapes loads its compiled programs instead of compiling.
    `MLM_VS_CLM_COMPILATION_CACHE` (else JAX's `JAX_COMPILATION_CACHE_DIR`) names the folder
    (`off` disables it); the default is
    `<project cache>/jax` (`MLM_VS_CLM_CACHE`, else ~/.cache/mlm_vs_clm). Returns the folder."""
    folder = (os.environ.get("MLM_VS_CLM_COMPILATION_CACHE") or os.environ.get("JAX_COMPILATION_CACHE_DIR")
              or os.path.join(cache_dir(), "jax"))
    if folder == "off":
        return ""
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return folder


def is_main_process() -> bool:
    """True in process 0: the one that logs, writes metrics and prints progress."""
    return jax.process_index() == 0


def sync(name: str, timeout_s: int = 600) -> None:
    """Block until every process reaches the barrier `name` (or fail after `timeout_s`).

    Every process must call `sync` the same number of times in the same order: the barrier
    ids carry a per-process counter, because the coordination service never reuses one.
    """
    if jax.process_count() == 1:
        return
    barrier_id = f"mlm_vs_clm:{name}:{next(_barrier_counter)}"
    client = jax_distributed.global_state.client
    if client is None:  # processes set up without the coordination service (unusual)
        multihost_utils.sync_global_devices(barrier_id)
        return
    try:
        client.wait_at_barrier(barrier_id, timeout_in_ms=int(timeout_s * 1000))
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DistributedError(
            f"distributed: barrier {name!r} failed in process {jax.process_index()}: {first_line}") from e
