"""Device count selection. Must run before jax is first imported (XLA reads XLA_FLAGS once)."""

from __future__ import annotations

import os
import re
import sys

FLAG = "--xla_force_host_platform_device_count"


class DeviceError(ValueError):
    pass


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
    import jax

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
