"""Modules nobody here wrote, lifted: warm forward time against eager torch, side by side in one run.

Rows (random weights, eval mode, fp32, 1 device, inference):
  * ResNet-18 (transformers' ``ResNetForImageClassification`` with ResNet-18's config) at 224 px, batch 8;
  * ViT-S/16 (transformers' ``ViTModel``: 12 layers, hidden 384, 6 heads) at 224 px, batch 8;
  * BERT-base shapes (transformers ``BertModel``: 12 layers, hidden 768, 12 heads) at 128 tokens, batch 8.

Each is timed in rounds (one call of every engine per round, the best round kept), eager torch under
``torch.no_grad`` with all cores, the lifted module as ``lifted(x)`` with its program compiled
first. The ratio is eager time / lifted time (above 1: the lifted forward is faster). Writes
``benchmarks/results/modules.json`` and prints a table naming the CPU and its vector ISA.

    python benchmarks/modules.py [--rounds 5] [--batch 8] [--only resnet18,vit_s,bert_base]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def resnet18(batch):
    import transformers as T  # timm and torchvision have no CPU wheel for torch 2.13 here: transformers' ResNet

    cfg = T.ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                         embedding_size=64, num_labels=1000)  # fmt: skip
    return T.ResNetForImageClassification(cfg), (torch.randn(batch, 3, 224, 224),)


def vit_s(batch):
    import transformers as T

    cfg = T.ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                      image_size=224, patch_size=16, attn_implementation="sdpa")  # fmt: skip
    return T.ViTModel(cfg, add_pooling_layer=False), (torch.randn(batch, 3, 224, 224),)


def bert_base(batch):
    import transformers as T

    model = T.BertModel(T.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, attn_implementation="sdpa"))  # fmt: skip
    return model, (torch.randint(0, 30522, (batch, 128)),)


MODULES = {"resnet18": ("ResNet-18, 224 px", resnet18), "vit_s": ("ViT-S/16, 224 px", vit_s),
           "bert_base": ("BERT-base, 128 tokens", bert_base)}  # fmt: skip


def _leaves(out):
    if isinstance(out, torch.Tensor) or hasattr(out, "block_until_ready"):
        return [out]
    if hasattr(out, "to_tuple"):  # a transformers ModelOutput
        return [x for v in out.to_tuple() for x in _leaves(v)]
    if isinstance(out, dict) or hasattr(out, "values"):
        return [x for v in out.values() for x in _leaves(v)]
    if isinstance(out, (tuple, list)):
        return [x for v in out for x in _leaves(v)]
    return []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--only", default=",".join(MODULES))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "modules.json"))
    args = ap.parse_args()

    import jax

    import sharding
    from bridge import cpu_kernels
    from bridge.files import atomic_write
    from bridge.lift import lift

    mesh = sharding.mesh_for("dp", 1)
    engines = {}
    for key in args.only.split(","):
        label, make = MODULES[key]
        torch.manual_seed(0)
        model, inputs = make(args.batch)
        model.eval()
        lifted = lift(model, mesh, "dp")
        t0 = time.perf_counter()
        got = lifted(*inputs)
        jax.block_until_ready(got)
        compile_s = time.perf_counter() - t0
        with torch.no_grad():
            want = model(*inputs)
        g, w = np.asarray(_leaves(got)[0]), _leaves(want)[0].numpy()
        err = float(np.abs(g - w).max() / np.abs(w).max())
        engines[key] = dict(label=label, model=model, inputs=inputs, lifted=lifted, compile_s=compile_s, rel_err=err,
                            eager=[], lifted_s=[])  # fmt: skip
        print(f"  {label}: compiled in {compile_s:.1f} s, relative error {err:.1e}", file=sys.stderr)

    for r in range(args.rounds):
        for e in engines.values():
            with torch.no_grad():
                t0 = time.perf_counter()
                e["model"](*e["inputs"])
                e["eager"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            jax.block_until_ready(e["lifted"](*e["inputs"]))
            e["lifted_s"].append(time.perf_counter() - t0)

    cpu = f"{cpu_kernels.cpu_name()} ({cpu_kernels.cpu_isa()}), {os.cpu_count()} cores"
    rows = []
    print(f"CPU: {cpu}; torch {torch.__version__} with {torch.get_num_threads()} threads, jax {jax.__version__}")
    print(f"| module (batch {args.batch}) | eager torch ms | lifted ms | eager / lifted | compile s | rel. error |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key, e in engines.items():
        eager, lifted = min(e["eager"]) * 1e3, min(e["lifted_s"]) * 1e3
        rows.append(dict(module=key, label=e["label"], batch=args.batch, eager_ms=eager, lifted_ms=lifted,
                         ratio=eager / lifted, compile_s=e["compile_s"], rel_err=e["rel_err"]))  # fmt: skip
        print(f"| {e['label']} | {eager:.1f} | {lifted:.1f} | {eager / lifted:.2f}x | {e['compile_s']:.1f} | "
              f"{e['rel_err']:.1e} |")  # fmt: skip
    with atomic_write(args.out) as fh:
        json.dump({"cpu": cpu, "cpu_isa": cpu_kernels.cpu_isa(), "rounds": args.rounds, "torch": torch.__version__,
                   "jax": jax.__version__, "rows": rows}, fh, indent=1)  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
