"""plan: abstract compilation matches the real program; Grok-1 planned on 8 devices in bounded memory."""

import json
import subprocess
import sys

import numpy as np
import pytest

import sharding
from bridge import hlo
from bridge import checkpoints
from bridge import plan as planner
from bridge.lift import lift


@pytest.mark.parametrize("preset,scheme", [("tiny-llama", "tp"), ("tiny-llama", "fsdp"), ("tiny-grok", "ep_tp"),
                                           ("tiny-neox", "dp_tp")])  # fmt: skip
def test_plan_equals_the_real_placement_and_program(preset, scheme, devices):
    mesh = sharding.mesh_for(scheme, 8, devices=devices)
    p = planner.plan(preset, mesh, scheme, dtype="float32", mode="forward", batch=8, seq=16)
    assert p["extrapolated"] is None  # 2 layers: compiled whole
    real = lift(checkpoints.load(preset).model, mesh, scheme)
    placed = sum(a.addressable_shards[0].data.nbytes for a in real.weights.values())
    assert p["param_bytes_per_device"] == placed
    compiled = real.compiled_forward(np.zeros((8, 16), np.int32))
    assert p["collectives"] == hlo.compiled_stats(compiled)["collectives"]


@pytest.mark.parametrize("preset,scheme", [("tiny-llama", "tp"), ("tiny-mixtral", "fsdp")])
def test_scanned_plan_equals_the_real_scanned_program(preset, scheme, devices):
    """Scanned, the plan compiles the whole model once; its collectives (a loop body's counted once
    per layer) equal the unrolled program's, and its bytes the real scanned placement's."""
    mesh = sharding.mesh_for(scheme, 8, devices=devices)
    p = planner.plan(preset, mesh, scheme, dtype="float32", mode="forward", batch=8, seq=16, scan_layers=True)
    assert p["extrapolated"] is None and p["scan_layers"] and "once" in p["compiled"]
    real = lift(checkpoints.load(preset).model, mesh, scheme, scan_layers=True)
    assert p["param_bytes_per_device"] == sum(a.addressable_shards[0].data.nbytes for a in real.weights.values())
    unrolled = lift(checkpoints.load(preset).model, mesh, scheme).compiled_forward(np.zeros((8, 16), np.int32))
    assert p["collectives"] == hlo.compiled_stats(unrolled)["collectives"]


def test_plan_int8_matches_real_int8_placement(devices):
    mesh = sharding.mesh_for("tp", 8, devices=devices)
    p = planner.plan("tiny-llama", mesh, "tp", dtype="int8", mode="forward", batch=1, seq=16)
    real = lift(checkpoints.load("tiny-llama", "bfloat16", quantize="int8").model, mesh, "tp")  # int8 over bf16
    assert p["param_bytes_per_device"] == sum(a.addressable_shards[0].data.nbytes for a in real.weights.values())


# Runs the CLI and reports the peak RSS of its own address space (VmHWM). getrusage's ru_maxrss would
# not do: Linux carries it over fork and exec, so a child starts with the test session's peak.
MEASURED = (
    "import json, runpy, sys\n"
    "sys.argv = ['torchax-bridge'] + json.loads(sys.argv[1])\n"
    "try:\n    runpy.run_module('bridge', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
    "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]\n"
    "print('PEAK_RSS_KIB', hwm, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def test_grok1_int8_tp8_plan_fits_and_is_cheap_to_compute():
    args = ["plan", "--preset", "grok-1", "--devices", "8", "--scheme", "tp", "--dtype", "int8",
            "--device-memory", "80GiB", "--json"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", MEASURED, json.dumps([*args, "--no-scan-layers"])], capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_kib = int(proc.stderr.rsplit("PEAK_RSS_KIB", 1)[1].split()[0])
    assert peak_kib < 2 * 2**20, f"plan used {peak_kib / 2**20:.2f} GiB"
    p = json.loads(proc.stdout)
    assert abs(p["parameters"] - 314e9) / 314e9 < 0.01
    # int8: one byte per parameter, split 8 ways, plus bf16 scales (one per output channel)
    want = 314e9 / 8
    assert want <= p["param_bytes_per_device"] <= want * 1.05
    assert p["fits_without_temporaries"] is True
    assert p["collectives"]["all-reduce"]["count"] >= 2 * 64
    assert p["extrapolated"] and "64" in p["extrapolated"]
    assert set(p["estimates"]) == {"H100", "H200", "TPU v5e", "TPU v5p"}
    # Unrolled is the default here (bf16 activations on CPU: what generate runs); scanned: one full
    # compile, the same parameter bytes and collectives, exact temporaries.
    proc = subprocess.run([sys.executable, "-c", MEASURED, json.dumps([*args, "--scan-layers"])], capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stderr.rsplit("PEAK_RSS_KIB", 1)[1].split()[0]) < 2 * 2**20
    s = json.loads(proc.stdout)
    assert s["extrapolated"] is None and "64 layers, scanned" in s["compiled"]
    assert s["param_bytes_per_device"] == p["param_bytes_per_device"]
    assert s["collectives"] == p["collectives"]


@pytest.mark.parametrize("preset,scheme,n,dtype", [("llama-3-8b", "tp", 8, "bfloat16"), ("neox-20b", "tp", 8, "bfloat16"),
                                                   ("grok-1", "ep_tp", 8, "int8")])  # fmt: skip
def test_plan_runs_for_big_presets(preset, scheme, n, dtype, devices):
    mesh = sharding.mesh_for(scheme, n, devices=devices)
    p = planner.plan(preset, mesh, scheme, dtype=dtype, mode="decode", batch=1, seq=1024)
    full = p["param_bytes_total"]
    assert p["param_bytes_per_device"] < full / n * 1.1
    # No full-precision copy of the 16-bit weights of a dense model in the program (issue 30): the
    # layout generate runs here, with the CPU kernels on each device's shards, keeps temporaries a
    # small fraction of the parameters (Llama-3-8B bf16 tp 8: 0.03 GiB against 2.4 with XLA's dots).
    # Grok-1's int8 experts unrolled are still converted whole by XLA:CPU (144 GiB; 2.5 scanned).
    if preset != "grok-1":
        assert p["temp_bytes_per_device"] <= 0.1 * p["param_bytes_per_device"], p["temp_bytes_per_device"]
    text = planner.format_plan(p)
    assert "roofline estimate" in text and "per device: parameters" in text


def test_grok1_on_64_simulated_devices_ep_tp():
    proc = subprocess.run([sys.executable, "-m", "bridge", "plan", "--preset", "grok-1", "--devices", "64",
                           "--scheme", "ep_tp", "--mesh", "expert=8,model=8", "--dtype", "int8", "--json"],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    p = json.loads(proc.stdout)
    assert p["mesh"] == {"expert": 8, "model": 8}
    # experts split 64 ways; attention (5.6B) and the embedding only over model=8 (replicated over expert)
    attention_and_embedding = 64 * 6144 * (2 * 6144 + 2 * 1024) + 131072 * 6144
    want = (p["parameters"] - attention_and_embedding) / 64 + attention_and_embedding / 8
    assert abs(p["param_bytes_per_device"] - want) / want < 0.01
