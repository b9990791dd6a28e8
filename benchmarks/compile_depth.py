"""Compile time against depth: generate's programs (prefill + on-device decode loop) for tiny-llama
with 2, 8 and 32 layers, unrolled and scanned (``--scan-layers``), measured side by side in one run;
then SmolLM2's decode speed both ways. Writes benchmarks/results/compile_depth.json.

    python benchmarks/compile_depth.py [--layers 2,8,32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"
os.environ["TORCHAX_BRIDGE_NO_CACHE"] = "1"  # every compile from scratch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2,8,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "compile_depth.json"))
    args = ap.parse_args()

    import model_torch
    import sharding
    from bridge.files import atomic_write
    from bridge.generate import Generator
    from bridge.lift import lift
    from bridge.models import open_model

    mesh = sharding.mesh_for("replicated", 1)
    ids = list(range(10, 40))
    rows = []
    # One-time process costs (torchax's first trace, XLA's first compile) kept out of the rows.
    Generator(lift(model_torch.from_preset("tiny-llama", num_layers=1), mesh, "replicated")).generate_ids([ids], 4)
    for layers in [int(n) for n in args.layers.split(",")]:
        model = model_torch.from_preset("tiny-llama", num_layers=layers)
        for scan in (False, True):
            gen = Generator(lift(model, mesh, "replicated", scan_layers=scan), stop_at_eos=False)
            r = gen.generate_ids([ids], 16)
            rows.append({"model": f"tiny-llama, {layers} layers", "layers": layers, "scan_layers": scan,
                         "compile_seconds": r.compile_seconds, "detail": gen.last_compile.describe()})  # fmt: skip
            print(f"tiny-llama {layers:>3} layers, {'scanned ' if scan else 'unrolled'}: compile {r.compile_seconds:.2f} s "
                  f"({gen.last_compile.describe()})", flush=True)  # fmt: skip
    # SmolLM2 both ways, decode measured in alternating rounds (the machine's bandwidth drifts).
    smol = list(range(100, 132))
    gens, firsts = {}, {}
    for scan in (False, True):
        gens[scan] = Generator(open_model("smollm2", devices=1, scheme="replicated", scan_layers=scan), stop_at_eos=False)
        firsts[scan] = gens[scan].generate_ids([smol], args.new_tokens)
    best = {False: 0.0, True: 0.0}
    for _ in range(3):
        for scan, gen in gens.items():
            best[scan] = max(best[scan], gen.generate_ids([smol], args.new_tokens).decode_tokens_per_second)
    for scan in (False, True):
        rows.append({"model": "smollm2", "layers": 30, "scan_layers": scan, "compile_seconds": firsts[scan].compile_seconds,
                     "decode_tokens_per_second": best[scan], "token_ids": firsts[scan].token_ids[0]})  # fmt: skip
        print(f"smollm2 {'scanned ' if scan else 'unrolled'}: compile {firsts[scan].compile_seconds:.2f} s, "
              f"decode {best[scan]:.1f} tokens/s (best of 3 alternating rounds)", flush=True)  # fmt: skip
    by = {(r["model"], r["scan_layers"]): r for r in rows}
    small, big = min(int(n) for n in args.layers.split(",")), max(int(n) for n in args.layers.split(","))
    summary = {
        f"scanned_{big}_over_{small}_layers": by[(f"tiny-llama, {big} layers", True)]["compile_seconds"]
        / by[(f"tiny-llama, {small} layers", True)]["compile_seconds"],
        f"unrolled_{big}_over_{small}_layers": by[(f"tiny-llama, {big} layers", False)]["compile_seconds"]
        / by[(f"tiny-llama, {small} layers", False)]["compile_seconds"],
        "smollm2_scanned_over_unrolled_decode": by[("smollm2", True)]["decode_tokens_per_second"]
        / by[("smollm2", False)]["decode_tokens_per_second"],
        "smollm2_same_tokens": by[("smollm2", True)]["token_ids"] == by[("smollm2", False)]["token_ids"],
    }
    for k, v in summary.items():
        print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
    with atomic_write(args.out) as fh:
        json.dump({"rows": rows, "summary": summary}, fh, indent=2)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
