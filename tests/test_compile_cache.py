"""The second run compiles nothing: traced programs (jax.export) and XLA executables (JAX's
persistent cache) come back from ``$TORCHAX_BRIDGE_CACHE``; the tokens are the same; switching the
cache off traces again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(cache: Path, *extra, no_cache: bool = False) -> tuple[dict, str]:
    env = {**os.environ, "TORCHAX_BRIDGE_CACHE": str(cache)}
    env.pop("TORCHAX_BRIDGE_NO_CACHE", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the suite's shared XLA cache (conftest): not this test's
    if no_cache:
        env["TORCHAX_BRIDGE_NO_CACHE"] = "1"
    argv = [sys.executable, "-m", "bridge", "generate", "--checkpoint", "tiny-llama", "--input-ids", "5,6,7,8",
            "--max-new-tokens", "8", "--devices", "2", "--scheme", "tp", *extra]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout.strip().splitlines()
    return text, proc.stderr


def test_second_run_reads_programs_and_executables_from_the_cache(tmp_path):
    first_out, first_err = generate(tmp_path)
    assert "trace" in first_err and "(new)" in first_err, first_err
    programs = sorted(p.name for p in (tmp_path / "programs").iterdir())
    assert programs and all(p.endswith(".jaxexport") for p in programs)
    assert any((tmp_path / "xla").iterdir())
    second_out, second_err = generate(tmp_path)
    assert second_out == first_out  # the same tokens
    detail = second_err.split("compile ")[1]
    assert "trace" in detail and "(cached)" in detail and "(new)" not in detail, second_err
    assert sorted(p.name for p in (tmp_path / "programs").iterdir()) == programs  # nothing new written
    # A new sampling mode is a new program; switching the cache off traces everything again.
    _, err = generate(tmp_path, "--temperature", "0.7", "--top-k", "5")
    assert "(new)" in err
    off_out, off_err = generate(tmp_path, no_cache=True)
    assert off_out == first_out and "(new)" in off_err and "(cached)" not in off_err
