"""Several processes, one global mesh: ``jax.distributed`` and the ``launch`` command.

Every process runs the same command. The standard environment variables join them:

    TORCHAX_BRIDGE_COORDINATOR=host:port   (process 0's address; also JAX_COORDINATOR_ADDRESS)
    TORCHAX_BRIDGE_NUM_PROCESSES=P         (also JAX_NUM_PROCESSES)
    TORCHAX_BRIDGE_PROCESS_ID=i            (also JAX_PROCESS_ID)

With them set (by ``torchax-bridge launch`` here, or by your cluster's launcher on each host),
``--devices`` counts devices per process and the mesh spans every process's devices, ordered by
process: a ``data x model`` mesh puts ``data`` across processes and ``model`` within one. Weights are
placed with ``jax.make_array_from_callback``, so each process fills only its own devices' slices.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque

from bridge.errors import LaunchError

ENV = {
    "coordinator": ("TORCHAX_BRIDGE_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("TORCHAX_BRIDGE_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("TORCHAX_BRIDGE_PROCESS_ID", "JAX_PROCESS_ID"),
}
TIMEOUT_ENV = "TORCHAX_BRIDGE_INIT_TIMEOUT"


def _env(key: str):
    for name in ENV[key]:
        if os.environ.get(name):
            return os.environ[name]
    return None


def configured() -> bool:
    return _env("coordinator") is not None


def initialize() -> bool:
    """Joins the distributed runtime when the environment says so (before any device is used).
    Returns whether this is a multi-process run."""
    if not configured():
        return False
    import jax

    if jax.config.jax_platforms in (None, "", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=_env("coordinator"),
        num_processes=int(_env("num_processes")),
        process_id=int(_env("process_id")),
        initialization_timeout=int(os.environ.get(TIMEOUT_ENV, "60")),
    )
    return True


def is_main() -> bool:
    """Process 0 prints results; the others stay quiet."""
    if not configured():
        return True
    import jax

    return jax.process_index() == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list[str], processes: int, devices_per_process: int, timeout: float = 60.0) -> int:
    """Runs ``python -m bridge <command>`` in ``processes`` local processes joined on loopback.

    Streams process 0's output. If any process fails, every other one is ended and the failure is
    reported (which process, its last lines); Ctrl-C ends them all. No child outlives this call.
    """
    if processes < 1 or devices_per_process < 1:
        raise LaunchError("--processes and --devices-per-process must be at least 1")
    if not command:
        raise LaunchError("nothing to launch: give a command after --, e.g. -- forward --checkpoint tiny-llama ...")
    port = free_port()
    children: list[subprocess.Popen] = []
    tails = [deque(maxlen=20) for _ in range(processes)]
    for pid in range(processes):
        env = dict(os.environ)
        env.update({
            ENV["coordinator"][0]: f"127.0.0.1:{port}",
            ENV["num_processes"][0]: str(processes),
            ENV["process_id"][0]: str(pid),
            TIMEOUT_ENV: str(int(timeout)),
            "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices_per_process}".strip(),
            "PYTHONUNBUFFERED": "1",
        })  # fmt: skip
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "bridge", *command, "--devices", str(devices_per_process)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,  # its own process group: ending it ends its children too
            )
        )

    def pump(i: int, proc: subprocess.Popen):
        for line in proc.stdout:
            tails[i].append(line.rstrip("\n"))
            if i == 0:
                print(line, end="", flush=True)

    readers = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(children)]
    for r in readers:
        r.start()

    def end_all():
        for p in children:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 10
        for p in children:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()

    try:
        while True:
            codes = [p.poll() for p in children]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i = failed[0]
                end_all()
                for r in readers:
                    r.join(timeout=2)
                said = [ln for ln in tails[i] if ln.startswith("torchax-bridge: error:")]
                if codes[i] == 2 and said:  # the child refused its input: a usage error, said once
                    raise LaunchError(f"process {i} of {processes}: {said[-1].removeprefix('torchax-bridge: error: ')}")
                how = f"signal {-codes[i]}" if codes[i] < 0 else f"exit code {codes[i]}"
                last = "\n".join(f"  [{i}] {line}" for line in tails[i]) or "  (no output)"
                print(f"torchax-bridge launch: process {i} of {processes} failed ({how}); all processes ended. "
                      f"Its last lines:\n{last}", file=sys.stderr)  # fmt: skip
                return 1
            if all(c == 0 for c in codes):
                for r in readers:
                    r.join(timeout=5)
                return 0
            time.sleep(0.1)
    except KeyboardInterrupt:
        end_all()
        print("torchax-bridge launch: interrupted; all processes ended", file=sys.stderr)
        return 130
    finally:
        end_all()
