"""Decode speed on this machine, measured side by side in one run.

Same weights (SmolLM2-135M-Instruct, fp32), a 32-token prompt, 128 new tokens, greedy:
  * ours: jitted prefill + on-device decode loop (donated KV cache), 1 device;
  * HF transformers ``generate`` in torch eager with its default cache;
  * the machine's memory bandwidth (a large array copy: bytes read + written per second, the best of
    one thread and all cores) and the decode roofline ``bandwidth / weight bytes`` (each token reads
    every weight once).
Then batch 8. Writes JSON to benchmarks/results/decode.json and prints a table.

    python benchmarks/decode.py [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPT = (
    "Write a short story about a dragon who wanted to learn how to fly. The dragon lived in a cave high "
    "on a mountain above a small village, and every morning it watched the birds"
)


def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Best of ``repeats`` copies of a ``nbytes`` array, (read + write) bytes per second: on one
    thread (numpy) and on all cores (torch splits a large copy over its intra-op threads). Decode
    here uses every core, so the roofline takes the larger."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    b = np.empty_like(a)
    one_thread = 2 * a.nbytes / min(_timed(lambda: np.copyto(b, a)) for _ in range(repeats))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    all_cores = 2 * a.nbytes / min(_timed(lambda: tb.copy_(ta)) for _ in range(repeats))
    return {"one_thread": one_thread, f"{torch.get_num_threads()}_threads": all_cores, "best": max(one_thread, all_cores)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode.json"))
    args = ap.parse_args()

    from bridge import checkpoints
    from bridge.files import atomic_write
    from bridge.generate import Generator
    from bridge.models import open_model

    lifted = open_model("smollm2", devices=1, scheme="replicated", dtype="float32")
    tok = lifted.tokenizer
    ids = tok.encode(PROMPT)[: args.prompt_tokens]
    assert len(ids) == args.prompt_tokens, "prompt too short for --prompt-tokens"
    n = args.new_tokens

    gen = Generator(lifted, stop_at_eos=False)  # every run decodes exactly n tokens
    # The same weights through transformers' own LlamaForCausalLM behind the adapter (the path any
    # architecture we did not rewrite takes).
    adapter = Generator(open_model("smollm2", devices=1, scheme="replicated", implementation="transformers"),
                        stop_at_eos=False)  # fmt: skip
    # bf16 weights (half the bytes): its own roofline; the matmuls accumulate in fp32.
    bf16_lifted = open_model("smollm2", devices=1, scheme="replicated", dtype="bfloat16")
    bf16 = Generator(bf16_lifted, stop_at_eos=False)

    def ours(batch: int, gen=gen) -> dict:
        runs = [gen.generate_ids([ids] * batch, n) for _ in range(args.repeats + 1)]  # first compiles
        best = max(runs[1:], key=lambda r: r["decode_tokens_per_second"])
        return {
            "tokens_per_second": best["decode_tokens_per_second"],
            "per_sequence_tokens_per_second": best["decode_tokens_per_second"] / batch,
            "prefill_seconds": best["prefill_seconds"],
            "compile_seconds": runs[0]["compile_seconds"],
            "token_ids": best["token_ids"][0],
        }

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(checkpoints.smollm2_dir(), dtype=torch.float32).eval()

    def hf_generate(batch: int) -> dict:
        x = torch.tensor([ids] * batch)
        rates, out = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False)
            rates.append(batch * n / (time.perf_counter() - t0))
        return {"tokens_per_second": max(rates), "token_ids": out[0, len(ids) :].tolist()}

    copies = memory_bandwidth()
    bandwidth = copies["best"]
    weight_bytes = sum(int(np.prod(w.shape)) * w.dtype.itemsize for w in lifted.weights.values())
    roofline = bandwidth / weight_bytes
    bf16_bytes = sum(int(np.prod(w.shape)) * w.dtype.itemsize for w in bf16_lifted.weights.values())
    rows = {}
    for batch in (1, 8):
        o, a, b, h = ours(batch), ours(batch, adapter), ours(batch, bf16), hf_generate(batch)
        rows[batch] = {
            "ours_tokens_per_second": o["tokens_per_second"],
            "bf16_tokens_per_second": b["tokens_per_second"],
            "bf16_vs_fp32": b["tokens_per_second"] / o["tokens_per_second"],
            "bf16_fraction_of_its_roofline": b["tokens_per_second"] / (bandwidth / bf16_bytes * batch),
            "bf16_same_greedy_tokens_as_fp32_first_16": b["token_ids"][:16] == o["token_ids"][:16],
            "adapter_tokens_per_second": a["tokens_per_second"],
            "adapter_vs_model_torch": a["tokens_per_second"] / o["tokens_per_second"],
            "adapter_same_greedy_tokens_as_hf": a["token_ids"] == h["token_ids"],
            "hf_tokens_per_second": h["tokens_per_second"],
            "speedup_vs_hf": o["tokens_per_second"] / h["tokens_per_second"],
            # batch B reads the weights once per step for B tokens
            "roofline_tokens_per_second": roofline * batch,
            "fraction_of_roofline": o["tokens_per_second"] / (roofline * batch),
            "prefill_seconds": o["prefill_seconds"],
            "compile_seconds": o["compile_seconds"],
            "same_greedy_tokens_as_hf": o["token_ids"] == h["token_ids"],
        }
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "model": "SmolLM2-135M-Instruct fp32",
        "prompt_tokens": len(ids),
        "new_tokens": n,
        "memory_bandwidth_bytes_per_second": bandwidth,
        "memory_bandwidth_copies": copies,
        "weight_bytes": weight_bytes,
        "bf16_weight_bytes": bf16_bytes,
        "decode_roofline_tokens_per_second_batch1": roofline,
        "batches": rows,
    }
    with atomic_write(args.out) as fh:
        json.dump(result, fh, indent=2)

    print(f"memory bandwidth (1 GiB copy, best of 1 thread and {torch.get_num_threads()}): {bandwidth / 1e9:.1f} GB/s; weights {weight_bytes / 1e6:.0f} MB; "
          f"roofline {roofline:.1f} tokens/s at batch 1")  # fmt: skip
    print(f"{'batch':>5} {'ours tok/s':>11} {'adapter':>8} {'adapt/ours':>10} {'bf16':>7} {'bf16/fp32':>9} "
          f"{'HF tok/s':>9} {'ours/HF':>8} {'roofline':>9} {'of roofline':>12} {'same tokens':>12}")  # fmt: skip
    for batch, r in rows.items():
        same = r["same_greedy_tokens_as_hf"] and r["adapter_same_greedy_tokens_as_hf"]
        print(f"{batch:>5} {r['ours_tokens_per_second']:>11.1f} {r['adapter_tokens_per_second']:>8.1f} "
              f"{r['adapter_vs_model_torch']:>9.0%} {r['bf16_tokens_per_second']:>7.1f} {r['bf16_vs_fp32']:>8.0%} "
              f"{r['hf_tokens_per_second']:>9.1f} "
              f"{r['speedup_vs_hf']:>7.2f}x {r['roofline_tokens_per_second']:>9.1f} "
              f"{r['fraction_of_roofline']:>11.0%} {str(same):>12}")  # fmt: skip
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
