"""Compile time against depth: generate's programs (prefill + on-device decode loop) for tiny-llama
with 2, 8 and 32 layers, unrolled and scanned (``--scan-layers``), and for transformers' own
``LlamaForCausalLM`` of the same widths and depths (a ``save_pretrained`` checkpoint opened with
``implementation="transformers"``: the bridge finds and scans its stack, ``scan.StackCalls``),
measured side by side in one run; then SmolLM2's decode speed both ways, and its compile through
our rewrite against transformers' class. Writes benchmarks/results/compile_depth.json.

    python benchmarks/compile_depth.py [--layers 2,8,32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"
os.environ["TORCHAX_BRIDGE_NO_CACHE"] = "1"  # every compile from scratch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def transformers_llama(model, path: Path) -> Path:
    """transformers' ``LlamaForCausalLM`` with ``model``'s widths, depth and weights, saved as users
    save one (no tokenizer)."""
    import torch
    import transformers

    c = model.config
    config = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                      intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                                      num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                                      max_position_embeddings=c.max_position_embeddings, rope_theta=c.rope_theta,
                                      tie_word_embeddings=False)  # fmt: skip
    hf = transformers.LlamaForCausalLM(config)
    missing = hf.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert not [k for k in missing if "rotary" not in k], f"weights transformers' class lacks: {missing}"
    hf.to(torch.float32).save_pretrained(path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2,8,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "compile_depth.json"))
    args = ap.parse_args()

    import model_torch
    import sharding
    from bridge import cpu_kernels
    from bridge.files import atomic_write
    from bridge.generate import Generator
    from bridge.lift import lift
    from bridge.models import open_model

    mesh = sharding.mesh_for("replicated", 1)
    ids = list(range(10, 40))
    rows = []
    # One-time process costs (torchax's first trace, XLA's first compile) kept out of the rows.
    Generator(lift(model_torch.from_preset("tiny-llama", num_layers=1), mesh, "replicated")).generate_ids([ids], 4)
    tmp = Path(tempfile.mkdtemp(prefix="compile_depth_"))
    for layers in [int(n) for n in args.layers.split(",")]:
        model = model_torch.from_preset("tiny-llama", num_layers=layers)
        hf_dir = transformers_llama(model, tmp / f"llama{layers}")
        for scan in (False, True):
            for name, lifted in (("tiny-llama", lambda: lift(model, mesh, "replicated", scan_layers=scan)),
                                 ("transformers Llama", lambda: open_model(str(hf_dir), devices=1, scheme="replicated",
                                                                           implementation="transformers",
                                                                           scan_layers=scan, with_tokenizer=False))):  # fmt: skip
                gen = Generator(lifted(), stop_at_eos=False)
                r = gen.generate_ids([ids], 16)
                rows.append({"model": f"{name}, {layers} layers", "layers": layers, "scan_layers": scan,
                             "compile_seconds": r.compile_seconds, "detail": gen.last_compile.describe()})  # fmt: skip
                print(f"{name} {layers:>3} layers, {'scanned ' if scan else 'unrolled'}: compile {r.compile_seconds:.2f} s "
                      f"({gen.last_compile.describe()})", flush=True)  # fmt: skip
    # SmolLM2 through transformers' own class, scanned (the default), against our rewrite's compile.
    hf_smol = Generator(open_model("smollm2", devices=1, scheme="replicated", implementation="transformers"),
                        stop_at_eos=False).generate_ids([list(range(100, 132))], 16)  # fmt: skip
    rows.append({"model": "smollm2, transformers class", "layers": 30, "scan_layers": True,
                 "compile_seconds": hf_smol.compile_seconds})  # fmt: skip
    print(f"smollm2 transformers class, scanned: compile {hf_smol.compile_seconds:.2f} s", flush=True)
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
    depth = lambda name, scan: (by[(f"{name}, {big} layers", scan)]["compile_seconds"]  # noqa: E731
                                / by[(f"{name}, {small} layers", scan)]["compile_seconds"])  # fmt: skip
    summary = {
        f"scanned_{big}_over_{small}_layers": depth("tiny-llama", True),
        f"unrolled_{big}_over_{small}_layers": depth("tiny-llama", False),
        f"transformers_scanned_{big}_over_{small}_layers": depth("transformers Llama", True),
        f"transformers_unrolled_{big}_over_{small}_layers": depth("transformers Llama", False),
        "smollm2_transformers_class_over_rewrite_compile": by[("smollm2, transformers class", True)]["compile_seconds"]
        / by[("smollm2", True)]["compile_seconds"],
        "smollm2_scanned_over_unrolled_decode": by[("smollm2", True)]["decode_tokens_per_second"]
        / by[("smollm2", False)]["decode_tokens_per_second"],
        "smollm2_same_tokens": by[("smollm2", True)]["token_ids"] == by[("smollm2", False)]["token_ids"],
    }
    for k, v in summary.items():
        print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
    with atomic_write(args.out) as fh:
        json.dump({"cpu": f"{cpu_kernels.cpu_name()} ({cpu_kernels.cpu_isa()}), {os.cpu_count()} cores", "rows": rows, "summary": summary}, fh, indent=2)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
