"""Device count selection. Must run before jax is first imported (XLA reads XLA_FLAGS once)."""

from __future__ import annotations

import os
import re
import sys

from bridge.errors import DeviceError

FLAG = "--xla_force_host_platform_device_count"




def request_cpu_devices(n: int) -> None:
    """Asks XLA for ``n`` host (CPU) devices. Effective only if jax's backend has not started yet."""
    if n < 1:
        raise DeviceError(f"--devices must be at least 1, got {n}")
    flags = re.sub(rf"{FLAG}=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}={n}".strip()


def backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return bool(getattr(xla_bridge, "_backends", None))


def setup(n: int | None) -> list:
    """Returns ``n`` devices (all of them when ``n`` is None), simulating CPU devices if needed.

    On CPU, ``n`` simulated devices are created (when jax has not started yet). On an accelerator,
    ``n`` must not exceed the devices present.
    """
    if n is not None:
        if n < 1:
            raise DeviceError(f"--devices must be at least 1, got {n}")
        if not backend_started():
            request_cpu_devices(n)
    from bridge import distributed

    if distributed.configured() and not backend_started():
        distributed.initialize()  # several processes: --devices counts each process's devices
    import jax

    if jax.process_count() > 1:
        if n is not None and jax.local_device_count() < n:
            raise DeviceError(f"--devices {n} per process: this process has {jax.local_device_count()}")
        per = n or jax.local_device_count()
        return [d for d in jax.devices() if d.id in {x.id for x in _local_first(jax, per)}]
    devices = jax.devices()
    if n is None:
        return devices
    if len(devices) < n:
        where = devices[0].platform
        hint = (
            f"set XLA_FLAGS={FLAG}={n} before jax is imported"
            if where == "cpu"
            else f"this {where} host offers {len(devices)}; pass --devices {len(devices)} or fewer"
        )
        raise DeviceError(f"--devices {n}: only {len(devices)} {where} devices available ({hint})")
    return devices[:n]


def _local_first(jax, per_process: int) -> list:
    """The first ``per_process`` devices of every process, ordered by process."""
    out = []
    for p in range(jax.process_count()):
        out += [d for d in jax.devices() if d.process_index == p][:per_process]
    return out


def device_memory(mesh) -> tuple[int, int, str] | None:
    """(bytes free where this process's devices of ``mesh`` keep their buffers, how many devices share
    them, a phrase naming them), or None when unknown. CPU devices share this host's memory (each
    holds its own shard: ``--devices 8`` replicated is eight copies); an accelerator has its own."""
    import os

    import jax

    if os.environ.get("TORCHAX_BRIDGE_MEMORY_CHECK", "1") == "0":
        return None
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    cpus = [d for d in local if d.platform == "cpu"]
    if cpus:
        import psutil

        have = psutil.virtual_memory().available
        return have, len(cpus), f"this host has {have / 2**30:.1f} GiB available for its {len(cpus)} CPU device(s)"
    have = (local[0].memory_stats() or {}).get("bytes_limit") if local else None
    return (have, 1, f"a {local[0].device_kind} holds {have / 2**30:.1f} GiB") if have else None
