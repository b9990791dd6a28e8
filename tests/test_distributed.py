"""Several processes through jax.distributed (2 processes x 4 CPU devices on loopback, gloo)."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from conftest import RTOL, max_rel


def bridge(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def held(out: str) -> int:
    return int(re.search(r"parameter bytes held by this process: ([\d,]+)", out).group(1).replace(",", ""))


# SmolLM2 across two processes is the generate test below (dp_tp, its attention replicated by the
# fallback); tp across processes on a realistic head layout is tests/test_weight_plan.py's launch
# matrix (kv heads repeated). The forward here on SmolLM2 too cost 72 s of the suite for no new path.
@pytest.mark.parametrize("checkpoint", ["tiny-llama"])
@pytest.mark.parametrize("scheme", ["tp", "dp_tp"])
def test_two_processes_equal_one_process(tmp_path, checkpoint, scheme):
    common = ["--checkpoint", checkpoint, "--scheme", scheme, "--fallback", "replicate", "--prompt" if checkpoint == "smollm2" else "--input-ids",
              "The capital of France is" if checkpoint == "smollm2" else "1,2,3,4,5,6,7,8"]  # fmt: skip
    one = bridge("forward", *common, "--devices", "8", "--save-logits", str(tmp_path / "one.npy"))
    two = bridge("launch", "--processes", "2", "--devices-per-process", "4", "--",
                 "forward", *common, "--save-logits", str(tmp_path / "two.npy"))  # fmt: skip
    assert max_rel(np.load(tmp_path / "two.npy"), np.load(tmp_path / "one.npy")) < RTOL
    assert two.count("logits shape") == 1  # only process 0 prints
    if scheme == "dp_tp":  # model within a process: each holds one replica, the single process two
        assert abs(held(two) / held(one) - 0.5) < 0.05, (held(two), held(one))


def test_two_processes_generate_the_same_text(smollm2):
    args = ["generate", "--chat", "--prompt", "What is the capital of France?", "--scheme", "dp_tp",
            "--fallback", "replicate", "--max-new-tokens", "16", "--json"]  # fmt: skip
    import json

    one = json.loads(bridge(*args, "--devices", "8").strip().splitlines()[-1])
    two = json.loads(bridge("launch", "--processes", "2", "--devices-per-process", "4", "--", *args).strip().splitlines()[-1])
    assert two["token_ids"] == one["token_ids"] and "Paris" in two["text"]


def test_a_killed_child_fails_the_launch_and_leaves_nothing_behind():
    launcher = subprocess.Popen(
        [sys.executable, "-m", "bridge", "launch", "--processes", "2", "--devices-per-process", "4", "--",
         "generate", "--checkpoint", "tiny-llama", "--input-ids", "1,2,3", "--max-new-tokens", "200"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    me = psutil.Process(launcher.pid)
    deadline = time.time() + 60
    victim = None
    while time.time() < deadline and victim is None:
        kids = [c for c in me.children() if "TORCHAX_BRIDGE_PROCESS_ID" in (c.environ() or {})]
        ones = [c for c in kids if c.environ().get("TORCHAX_BRIDGE_PROCESS_ID") == "1"]
        if len(kids) == 2 and ones:
            time.sleep(3)  # let it get going
            victim = ones[0]
        time.sleep(0.1)
    assert victim is not None, "the launcher did not start its processes"
    family = [victim] + [c for c in me.children(recursive=True)]
    t0 = time.time()
    os.kill(victim.pid, signal.SIGKILL)
    out, err = launcher.communicate(timeout=60)
    assert time.time() - t0 < 60
    assert launcher.returncode != 0
    assert "process 1 of 2 failed (signal 9)" in err
    time.sleep(1)
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive
