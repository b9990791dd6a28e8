"""8 simulated CPU devices for every test (set before jax is first imported), and shared fixtures."""

import os
import re
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    + " --xla_force_host_platform_device_count=8"
).strip()

# Compile caches off for the suite (CI starts empty, so they would only cost the writing);
# tests/test_compile_cache.py switches them on in a directory of its own.
os.environ["TORCHAX_BRIDGE_NO_CACHE"] = "1"

# Except XLA's own persistent compilation cache, shared by the suite's workers and the CLI processes
# they start, for this run only (a fresh directory per run, removed at the end): many tests compile
# the same programs (the same presets, shapes and meshes), and a hit skips XLA's compile, the larger
# part of a test's time. Tracing and lowering still run in every test.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
XLA_CACHE = os.path.join(tempfile.gettempdir(), f"torchax-bridge-tests-{_RUN}")
os.environ["JAX_COMPILATION_CACHE_DIR"] = XLA_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # fp32 parity checks at 1e-4


def pytest_sessionfinish(session):
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller, after every worker is done
        shutil.rmtree(XLA_CACHE, ignore_errors=True)


RTOL = 1e-4  # fp32, relative to the largest logit magnitude


def _no_compiler() -> bool:
    from bridge import cpu_kernels

    return cpu_kernels._compiler() is None


# Tests of the CPU kernels skip, with this reason, only where no compiler can build them; with a
# compiler a failed build is a failure (any CPU builds them: native and, on AVX-512, avx2).
needs_compiler = pytest.mark.skipif(_no_compiler(), reason="no C++ compiler: the kernels cannot be built here "
                                    "(test_without_a_compiler_... covers that machine)")  # fmt: skip


def max_rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="session")
def smollm2():
    from bridge import checkpoints

    return checkpoints.load("smollm2")


# Autouse: jax's backend starts with 8 devices before any test runs, whatever runs first in a
# worker (a CLI call with --devices 4 starting it first had left that worker 4 devices).
@pytest.fixture(scope="session", autouse=True)
def devices():
    assert len(jax.devices()) == 8, "tests expect 8 simulated CPU devices"
    return jax.devices()


def random_ids(vocab: int, shape, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def save(config, path, std: float | None = None) -> str:
    """A tiny random transformers model as users make one: ``save_pretrained`` of the class built
    from ``config`` (config + safetensors, no tokenizer). ``std``: matrices drawn that wide instead
    of the class's own init, whose tiny recurrent models answer one token forever."""
    import transformers as T

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config)
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 2:
                    p.normal_(0, std)
    model.save_pretrained(path)
    return str(path)


# A 2-layer Mamba (state caches only); with ``save(..., std=0.3)`` its greedy tokens vary.
TINY_MAMBA = dict(vocab_size=517, hidden_size=64, intermediate_size=128, state_size=8, num_hidden_layers=2, conv_kernel=4,
                  time_step_rank=8)  # fmt: skip
