"""Examples, `compare` and `profile`, run as a user runs them."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args, timeout=600):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_example_01_forward_core_flow():
    out = run(["examples/01_forward.py", "--checkpoint", "tiny-llama"])
    assert "1 device(s): first call" in out and "8 device(s): first call" in out
    diff = float(out.strip().split("max relative difference ")[-1])
    assert diff < 1e-4


def test_example_02_generate_smollm2():
    out = run(["examples/02_generate.py", "--max-new-tokens", "12"])
    assert "Paris" in out and "tokens/s" in out


def test_example_03_profile(tmp_path):
    out = run(["examples/03_profile.py", "--checkpoint", "tiny-llama", "--devices", "8", "--logdir", str(tmp_path)])
    assert f"tensorboard --logdir {tmp_path}" in out and "time per named layer" in out


def test_example_04_swap_sharding():
    out = run(["examples/04_swap_sharding.py", "--checkpoint", "tiny-llama"])
    assert "== mlp_only" in out and "== tp" in out
    assert float(out.strip().split("max relative difference ")[-1]) < 1e-4


def test_example_05_moe_expert_parallel():
    out = run(["examples/05_moe_expert_parallel.py"])
    assert "== tp" in out and "== ep" in out and "(1, 688, 64) per device" in out
    assert "all-reduce" in out


def test_example_06_your_own_module(tmp_path):
    out = run(["examples/06_your_own_module.py", "--logdir", str(tmp_path)])
    # the script's own table, on the trunk's stacked weights (its 4 identical blocks run as one scan)
    assert "trunk.*.mixer.qkv.bias" in out and "P(None, 'model')" in out
    for key in ("logits", "tokens"):
        err = float(out.split(f"{key}: shape")[1].split("max rel. error vs eager ")[1].split()[0])
        assert err < 1e-5
    assert "OK: every module within" in out
    assert "time per named layer" in out and "trunk.*.mixer (per layer, 4 scanned)" in out


def test_example_07_finetune():
    out = run(["examples/07_finetune.py", "--steps", "4"])
    line = next(l for l in out.splitlines() if l.startswith("loss of the whole text"))
    before, after = (float(w.rstrip(",")) for w in (line.split("before ")[1].split()[0], line.split("after ")[1].split()[0]))
    assert after < before
    assert "step   4: loss" in out and "per device: parameters" in out


def test_example_08_trains_a_vision_model_with_its_own_loss():
    out = run(["examples/08_train_vision.py", "--steps", "20", "--devices", "2"])
    line = next(l for l in out.splitlines() if l.startswith("loss "))
    first, last = (float(x) for x in line.split(" (")[0].removeprefix("loss ").split(" -> "))
    assert last < 0.7 * first, line
    accuracy = float(line.split("held-out accuracy ")[1].split("%")[0])
    assert accuracy > 30.0, line  # chance is 10%


def test_compare_writes_csv_md_png_with_a_row_per_scheme(tmp_path):
    schemes = ["replicated", "tp", "fsdp", "dp", "dp_tp", "ep_tp"]
    run(["-m", "bridge", "compare", "--checkpoint", "tiny-llama", "--devices", "8", "--schemes", ",".join(schemes),
         "--batch", "8", "--seq", "16", "--repeats", "3", "--out", str(tmp_path)])  # fmt: skip
    rows = {r["scheme"]: r for r in csv.DictReader(open(tmp_path / "compare.csv"))}
    assert list(rows) == schemes
    for name, r in rows.items():
        assert r["status"] == "ok", r
        assert float(r["max_rel_diff"]) < 1e-4
        assert 0 < float(r["step_ms_min"]) <= float(r["step_ms_median"]) <= float(r["step_ms_max"])
        assert int(r["param_bytes_per_device"]) > 0 and int(r["peak_bytes_per_device"]) > 0
    layers = 2  # tiny-llama: tp needs 2 all-reduces per layer plus at most 2 (embedding, head)
    assert 2 * layers <= int(rows["tp"]["all_reduce"]) <= 2 * layers + 2
    assert int(rows["replicated"]["collective_bytes"]) == 0
    assert int(rows["tp"]["param_bytes_per_device"]) < int(rows["replicated"]["param_bytes_per_device"]) / 4
    assert (tmp_path / "compare.md").read_text().count("\n| ") == len(schemes) + 2  # header, separator, rows
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_compare_reports_a_scheme_that_does_not_fit(tmp_path, smollm2):
    run(["-m", "bridge", "compare", "--devices", "8", "--schemes", "tp,dp", "--batch", "8", "--seq", "8",
         "--repeats", "1", "--out", str(tmp_path)])  # fmt: skip
    rows = {r["scheme"]: r for r in csv.DictReader(open(tmp_path / "compare.csv"))}
    assert rows["tp"]["status"].startswith("does not fit") and "heads" in rows["tp"]["status"]
    assert rows["dp"]["status"] == "ok"


@pytest.mark.parametrize("mode,scan", [("forward", False), ("decode", True)])
def test_profile_trace_names_layers_and_steps(tmp_path, mode, scan):
    out = run(["-m", "bridge", "profile", "--checkpoint", "tiny-llama", "--devices", "8", "--scheme", "tp",
               "--steps", "3", "--mode", mode, "--logdir", str(tmp_path),
               "--scan-layers" if scan else "--no-scan-layers"])  # fmt: skip
    assert f"tensorboard --logdir {tmp_path}" in out
    from bridge import profiling

    path = profiling.find_xplane(tmp_path)
    trace = profiling.read_trace(path)  # the XSpace protobuf, parsed
    steps = {f"step {s['step_num']}" for plane, line, name, dur, s in trace["events"] if name == "step"}
    assert steps == {"step 0", "step 1", "step 2"}
    named = {profiling.innermost_layer(n) for n in trace["op_names"].values()}
    if scan:  # one scan body, named by its layer's modules; the summary gives the time per layer
        assert "layers.0.self_attn" in named and "layers.0.mlp" in named
        assert "layers.*.mlp (per layer, 2 scanned)" in out
        # The scan's while loop holds its body's ops: its self time excludes them.
        loops = [(dur, s) for _, _, _, dur, s in trace["events"] if str(s.get("hlo_op", "")).startswith("while")]
        assert loops and all(s["self_ps"] < dur / 2 for dur, s in loops)
    else:
        assert "layers.1.self_attn" in named and "layers.0.mlp" in named
        assert "layers.1.mlp" in out.split("time per named layer:")[1]
    assert all(0 <= s["self_ps"] <= dur for _, _, _, dur, s in trace["events"])
    timed = [s["hlo_op"] for _, _, _, _, s in trace["events"] if "hlo_op" in s]
    layer_ops = [o for o in timed if any(profiling.innermost_layer(n or "") for (m, h), n in trace["op_names"].items() if h == o)]
    assert layer_ops, "no traced op maps to a model layer"
