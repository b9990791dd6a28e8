"""Decode speed on this machine, measured side by side in one run.

Same weights (SmolLM2-135M-Instruct), a 32-token prompt, 128 new tokens, greedy, one row per engine
and batch:
  * ours: jitted prefill + on-device decode loop (donated KV cache), 1 device: fp32 (the scanned
    decoder stack, the default; the same with the small-batch CPU kernel switched off, i.e. XLA's
    own GEMM at batch > 1; and unrolled), int8
    weight-only (per-channel scales), bf16 weights, and transformers' own class behind the adapter;
  * HF transformers ``generate`` in torch eager with its default cache;
  * llama.cpp (``llama_cpp_peer``) on the same weights as F32 and Q8_0 GGUFs, when importable;
  * on an AVX-512 machine, our fp32/int8/bf16 rows again with the kernel's AVX2 build forced
    (``TORCHAX_BRIDGE_CPU_KERNELS=avx2``), so one run shows what a machine without AVX-512 gets;
  * prefill: a ``--prefill-tokens`` (480) prompt at batch 1, ours fp32 against llama.cpp F32's prompt
    processing (``llama.eval`` of the same ids);
  * the machine's memory bandwidth (a large array copy: bytes read + written per second, the best of
    one thread and all cores) and the decode roofline ``bandwidth / weight bytes x batch`` (each step
    reads every weight once for ``batch`` tokens).
Everything is loaded and compiled first, then timed in rounds (one run of every engine and batch per
round, the best round kept), so the machine's drifting bandwidth is shared alike. Each row's roofline
uses its own weight bytes, two ways:
  * "of roofline": against the best bandwidth seen in the whole run (at the start, and a 1 GiB copy
    in every round) -- the strict figure;
  * "paired": each timed run against the bandwidth measured right before and after it (a 256 MiB
    copy each side, their mean), the median over the rounds. This machine's bandwidth swings
    20-53 GB/s from minute to minute (a VM with neighbours), so a rate and a bandwidth from
    different minutes are a mismatched pair; the paired figure compares like with like.
Every row names the kernel build it ran (its vector ISA) and the table's header the CPU. Writes JSON to
benchmarks/results/decode.json and prints a table.

``--preset llama-3-8b [--layers N]``: real widths instead (hidden 4096, intermediate 14336, 32 q / 8
kv heads, vocab 128256; ``N`` of its 32 layers, random bf16 weights written once as a HF checkpoint
into the cache) on whatever jax's default device is -- an accelerator when there is one. Rows: ours
bf16 (scanned and unrolled), ours int8 weight-only (bf16 activations), and transformers' own class in
torch eager on the same device (``generate``, its default cache) on the same weights. The roofline
is the device's own copy bandwidth (a jitted elementwise pass over 1 GiB) over the bytes one decode
step reads (every weight but the input embedding table). Writes
``benchmarks/results/decode_<preset>_<N>l_<device>.json``.

    python benchmarks/decode.py [--new-tokens 128] [--repeats 3]
    python benchmarks/decode.py --preset llama-3-8b --layers 8 --batches 1,8,64
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # llama_cpp_peer

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPT = (
    "Write a short story about a dragon who wanted to learn how to fly. The dragon lived in a cave high "
    "on a mountain above a small village, and every morning it watched the birds"
)


# transformers' class against our rewrite of the same dtype
REWRITE_OF = {"ours fp32, transformers class": "ours fp32", "ours int8, transformers class": "ours int8 (weight-only)",
              "ours bf16, transformers class": "ours bf16"}  # fmt: skip


def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Best of ``repeats`` copies of a ``nbytes`` array, (read + write) bytes per second: on one
    thread (numpy) and on all cores (torch splits a large copy over its intra-op threads). Decode
    here uses every core, so the roofline takes the larger."""
    a, b = _buffers(nbytes)
    one_thread = 2 * a.nbytes / min(_timed(lambda: np.copyto(b, a)) for _ in range(repeats))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    all_cores = 2 * a.nbytes / min(_timed(lambda: tb.copy_(ta)) for _ in range(repeats))
    return {"one_thread": one_thread, f"{torch.get_num_threads()}_threads": all_cores, "best": max(one_thread, all_cores)}


@functools.cache
def _buffers(nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.ones(nbytes // 4, dtype=np.float32)
    return a, np.ones_like(a)  # both touched: no page faults inside the timed copies


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def long_prompt(tokenizer, n: int) -> list[int]:
    """``n`` token ids of English text (the prompt repeated) for the prefill rows."""
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(PROMPT + " ")
    return ids[:n]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=480)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/decode.json (or decode_<preset>_... )")
    ap.add_argument("--preset", help="llama-3-8b: real widths on jax's default device (see above)")
    ap.add_argument("--layers", type=int, default=8, help="with --preset: how many of its decoder layers")
    args = ap.parse_args()
    os.environ.setdefault("TORCHAX_BRIDGE_NO_CACHE", "1")  # compile seconds measured cold, every run
    if args.preset:
        return preset_main(args)
    args.out = args.out or str(Path(__file__).parent / "results" / "decode.json")

    from bridge import checkpoints, cpu_kernels
    from bridge.files import atomic_write
    from bridge.generate import Generator
    from bridge.host_memory import HugePagesAfterFirstRequest
    from bridge.models import open_model

    batches = [int(b) for b in args.batches.split(",")]
    n = args.new_tokens
    # The bandwidth is measured in every round too, beside the engines, and the best kept like
    # theirs: measured once at the start it was 28-39 GB/s in three runs minutes apart.
    copies = memory_bandwidth()
    bandwidths = [copies["best"]]

    def weight_bytes(lifted) -> int:
        return sum(int(np.prod(w.shape)) * w.dtype.itemsize for w in lifted.weights.values())

    rows: list[dict] = []
    ids = None

    def add(engine: str, batch: int, rate: float, nbytes: int, tokens: list[int], **extra) -> None:
        rows.append({"engine": engine, "batch": batch, "tokens_per_second": rate, "weight_bytes": nbytes,
                     # each step reads every weight once for `batch` tokens
                     "roofline_tokens_per_second": bandwidth / nbytes * batch,
                     "fraction_of_roofline": rate / (bandwidth / nbytes * batch), "token_ids": tokens, **extra})  # fmt: skip
        print(f"  {engine:<28} batch {batch}: {rate:7.1f} tokens/s", file=sys.stderr, flush=True)

    # Every engine is loaded and compiled first; then the timed runs go in rounds, each round one
    # run of every engine and batch, best of the rounds kept: the machine's bandwidth drifts by tens
    # of percent between minutes, and interleaving gives every engine the same minutes.
    # Ours: fp32 (model_torch, scanned stack: the default), the same unrolled, int8 weight-only, bf16
    # (scanned where the kernels' layer copy slices its stack: ``scan._slow_16_bit_slices``), and
    # transformers' own class behind the adapter (scanned by the bridge: ``scan.StackCalls``).
    # "XLA's GEMM": the same fp32 model with ``cpu_kernels`` switched off, so batch 8 shows the
    # small-batch kernel against XLA:CPU's own product side by side.
    # Each transformers-class row right after our rewrite in its dtype: loaded next to each other (the
    # later a model is loaded, the more fragmented memory is when its weights ask for huge pages) and
    # timed next to each other in every round.
    engines = [
        ("ours fp32", dict()),
        ("ours fp32, transformers class", dict(implementation="transformers")),
        ("ours fp32, XLA's GEMM", dict(env={cpu_kernels.SWITCH: "0"})),
        ("ours fp32, unrolled", dict(scan_layers=False)),
        ("ours int8 (weight-only)", dict(quantize="int8")),
        ("ours int8, transformers class", dict(implementation="transformers", quantize="int8")),
        ("ours bf16", dict(dtype="bfloat16")),
        ("ours bf16, transformers class", dict(implementation="transformers", dtype="bfloat16")),
    ]
    if "avx2" in cpu_kernels.runnable_variants():  # an AVX-512 CPU: what one without it gets, side by side
        avx2 = {cpu_kernels.SWITCH: "avx2"}
        engines += [("ours fp32, AVX2 build", dict(env=avx2)), ("ours int8, AVX2 build", dict(env=avx2, quantize="int8")),
                    ("ours bf16, AVX2 build", dict(env=avx2, dtype="bfloat16"))]  # fmt: skip
    builds = {}  # engine -> the kernel build it runs: its ISA, or why none
    huge_pages = {}  # engine -> its generator's huge-page hook (what the kernel refused, after the runs)
    runners = {}  # (engine, batch) -> run() returning (tokens/s, greedy tokens of row 0, extra)
    prefill_runners = {}  # engine -> run() returning prompt tokens/s
    for engine, kw in engines:
        env = mock.patch.dict(os.environ, kw.pop("env", {}))  # read while its programs are traced (first generate)
        env.start()
        builds[engine] = (f"{cpu_kernels.selected()}: {cpu_kernels.isa()}" if cpu_kernels.available()
                          else f"XLA ({cpu_kernels.why_unavailable()})")  # fmt: skip
        lifted = open_model("smollm2", devices=1, scheme="replicated", **kw)
        if ids is None:
            ids = lifted.tokenizer.encode(PROMPT)[: args.prompt_tokens]
            assert len(ids) == args.prompt_tokens, "prompt too short for --prompt-tokens"
        gen = Generator(lifted, stop_at_eos=False)  # every run decodes exactly n tokens
        huge_pages[engine] = next((h for h in gen.after_request if isinstance(h, HugePagesAfterFirstRequest)), None)
        nbytes = weight_bytes(lifted)
        for batch in batches:
            first = gen.generate_ids([ids] * batch, n)  # compiles

            def run(gen=gen, batch=batch, first=first):
                r = gen.generate_ids([ids] * batch, n)
                return r.decode_tokens_per_second, r.token_ids[0], dict(
                    prefill_seconds=r.prefill_seconds, compile_seconds=first.compile_seconds,
                    scan_layers=gen.lifted.scan_layers)  # fmt: skip

            runners[(engine, batch)] = (run, nbytes)
        if engine == "ours fp32":
            prefill_ids = long_prompt(lifted.tokenizer, args.prefill_tokens)
            gen.generate_ids([prefill_ids], 1)  # compiles

            def run_prefill(gen=gen):
                return args.prefill_tokens / gen.generate_ids([prefill_ids], 1).prefill_seconds

            prefill_runners["ours fp32"] = run_prefill
        env.stop()
        print(f"  {engine}: compiled", file=sys.stderr, flush=True)

    # Batch 1 as users run it: one `generate` request from the command line, a fresh process each
    # time (with the compile cache on, as by default; the warm-up fills it), no huge pages yet.
    cli_env = {k: v for k, v in os.environ.items() if k != "TORCHAX_BRIDGE_NO_CACHE"}

    def run_cli():
        argv = [sys.executable, "-m", "bridge", "generate", "--checkpoint", "smollm2", "--devices", "1",
                "--input-ids", ",".join(map(str, ids)), "--max-new-tokens", str(n), "--json"]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, env=cli_env, cwd=Path(__file__).parents[1])
        if done.returncode != 0:
            raise SystemExit(f"the CLI row failed: {done.stderr.strip()[-500:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        return r["decode_tokens_per_second"], r["token_ids"], {}

    run_cli()  # fills the compile cache
    runners[("ours fp32, CLI (fresh process)", 1)] = (run_cli, runners[("ours fp32", 1)][1])
    builds["ours fp32, CLI (fresh process)"] = builds["ours fp32"]

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(checkpoints.smollm2_dir(), dtype=torch.float32).eval()
    hf_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    for batch in batches:
        def run_hf(batch=batch):
            x = torch.tensor([ids] * batch)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return batch * n / (time.perf_counter() - t0), out[0, len(ids):].tolist(), {}  # prefill included: HF's own generate

        runners[("HF transformers eager", batch)] = (run_hf, hf_bytes)

    import llama_cpp_peer

    if llama_cpp_peer.available():
        src = checkpoints.smollm2_gguf()
        for qtype in ("F32", "Q8_0"):
            path = llama_cpp_peer.write_gguf(src, checkpoints.cache_dir() / f"smollm2-135m-instruct.{qtype}.gguf", qtype)
            peer = llama_cpp_peer.Peer(path, len(ids) + n + 8, os.cpu_count())
            peer.run(ids, 8)  # warm-up
            runners[(f"llama.cpp {qtype}", 1)] = (lambda peer=peer: (*peer.run(ids, n), {}), peer.weight_bytes)
            builds[f"llama.cpp {qtype}"] = "llama.cpp's own (built for this CPU)"
            if qtype == "F32":
                long_peer = llama_cpp_peer.Peer(path, args.prefill_tokens + 8, os.cpu_count())
                long_peer.prefill(prefill_ids)  # warm-up
                prefill_runners["llama.cpp F32"] = lambda p=long_peer: p.prefill(prefill_ids)
    else:
        print("  llama.cpp: llama_cpp not importable (pip install llama-cpp-python==0.3.36), rows left out",
              file=sys.stderr)  # fmt: skip

    best: dict = {}
    paired: dict = {}  # key -> [(tokens/s, bandwidth around that run)] per round
    prefill_rates: dict = {}  # engine -> [prompt tokens/s] per round
    for round_ in range(args.repeats):
        bandwidths.append(memory_bandwidth()["best"])
        for key, (run, _) in runners.items():
            before = memory_bandwidth(1 << 28, 3)["best"]
            rate, tokens, extra = run()
            around = (before + memory_bandwidth(1 << 28, 3)["best"]) / 2
            paired.setdefault(key, []).append((rate, around))
            if key not in best or rate > best[key][0]:
                best[key] = (rate, tokens, extra)
        for engine, run in prefill_runners.items():
            prefill_rates.setdefault(engine, []).append(run())
        print(f"  round {round_ + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    bandwidth = max(bandwidths)
    for (engine, batch), (rate, tokens, extra) in best.items():
        nbytes = runners[(engine, batch)][1]
        runs = paired[(engine, batch)]
        add(engine, batch, rate, nbytes, tokens, **extra,
            paired_rounds=[{"tokens_per_second": r, "bandwidth_bytes_per_second": b} for r, b in runs],
            fraction_of_paired_roofline=float(np.median([r / (b / nbytes * batch) for r, b in runs])))

    # Comparisons within this run.
    by = {(r["engine"], r["batch"]): r for r in rows}
    hf_tokens = by[("HF transformers eager", 1)]["token_ids"]
    for r in rows:
        r["kernel"] = builds.get(r["engine"], "-")
        hook = huge_pages.get(r["engine"])
        if hook is not None:  # a refused range stays on 4 KiB pages: slower reads (see bridge.host_memory)
            r["huge_page_refusals"] = [f"{advice} errno {errno}" for advice, errno in hook.refusals]
        base = by.get(("ours fp32", r["batch"]))
        r["vs_ours_fp32"] = r["tokens_per_second"] / base["tokens_per_second"] if base else None
        r["same_greedy_tokens_as_hf"] = r["token_ids"] == hf_tokens
        if r["engine"].endswith(", transformers class"):  # against our rewrite in the same dtype (issue 31)
            rewrite = by.get((REWRITE_OF[r["engine"]], r["batch"]))
            r["vs_rewrite"] = r["tokens_per_second"] / rewrite["tokens_per_second"] if rewrite else None
            # Also round by round, each run against the bandwidth measured around it (the two rows
            # run minutes apart within a round, and the bandwidth drifts): the median of the ratio
            # of their paired roofline fractions.
            if rewrite:
                theirs = paired[(REWRITE_OF[r["engine"]], r["batch"])]
                r["vs_rewrite_paired"] = float(np.median([(a / ba) / (b / bb) for (a, ba), (b, bb)
                                                          in zip(paired[(r["engine"], r["batch"])], theirs)]))  # fmt: skip
    peer = by.get(("llama.cpp F32", 1))
    # The same ratio round by round (runs a minute apart at most), median: steadier than best / best.
    per_round = [ours / theirs for (ours, _), (theirs, _) in
                 zip(paired[("ours fp32", 1)], paired.get(("llama.cpp F32", 1), []))]  # fmt: skip
    prefill = {engine: {"prompt_tokens": args.prefill_tokens, "tokens_per_second": max(rates), "per_round": rates}
               for engine, rates in prefill_rates.items()}  # fmt: skip
    if "llama.cpp F32" in prefill:
        prefill["ours fp32"]["vs_llama_cpp_f32"] = float(np.median(
            [a / b for a, b in zip(prefill_rates["ours fp32"], prefill_rates["llama.cpp F32"])]))  # fmt: skip
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cpu": cpu_kernels.cpu_name(), "cpu_isa": cpu_kernels.cpu_isa(),
                    "kernel_builds": {v: cpu_kernels.isa(v) or cpu_kernels.why_unavailable(v)
                                      for v in cpu_kernels.runnable_variants()}},  # fmt: skip
        "model": "SmolLM2-135M-Instruct",
        "prompt_tokens": len(ids),
        "new_tokens": n,
        "rounds": args.repeats,
        "memory_bandwidth_bytes_per_second": bandwidth,
        "memory_bandwidth_copies": copies,
        "memory_bandwidth_per_round": bandwidths,
        "cpu_kernel": cpu_kernels.why_unavailable() or "on",
        "ours_fp32_vs_llama_cpp_f32": by[("ours fp32", 1)]["tokens_per_second"] / peer["tokens_per_second"] if peer else None,
        "ours_fp32_vs_llama_cpp_f32_per_round": per_round,
        "rows": rows,
        "prefill": prefill,
    }
    with atomic_write(args.out) as fh:
        json.dump(result, fh, indent=2)

    print(f"CPU: {cpu_kernels.cpu_name()} ({cpu_kernels.cpu_isa()}), {os.cpu_count()} cores")
    print(f"memory bandwidth (1 GiB copy, best of 1 thread and {torch.get_num_threads()}, best of the start and "
          f"every round: {', '.join(f'{b / 1e9:.1f}' for b in bandwidths)}): {bandwidth / 1e9:.1f} GB/s; "
          f"roofline = bandwidth / weight bytes x batch")  # fmt: skip
    print(f"{'engine':<30} {'batch':>5} {'tok/s':>7} {'weights MB':>10} {'roofline':>9} {'of roofline':>11} "
          f"{'paired':>6} {'vs ours fp32':>12} {'same as HF':>10}  kernel")  # fmt: skip
    for r in rows:
        vs = f"{r['vs_ours_fp32']:.2f}x" if r["vs_ours_fp32"] else "-"
        print(f"{r['engine']:<30} {r['batch']:>5} {r['tokens_per_second']:>7.1f} {r['weight_bytes'] / 1e6:>10.0f} "
              f"{r['roofline_tokens_per_second']:>9.1f} {r['fraction_of_roofline']:>11.0%} "
              f"{r['fraction_of_paired_roofline']:>6.0%} {vs:>12} {str(r['same_greedy_tokens_as_hf']):>10}  {r['kernel']}")  # fmt: skip
    for r in rows:
        if r.get("huge_page_refusals") and r["batch"] == batches[0]:
            print(f"{r['engine']}: {len(r['huge_page_refusals'])} weight range(s) left on 4 KiB pages "
                  f"({r['huge_page_refusals'][0]}, ...)")  # fmt: skip
    for r in rows:
        if r.get("vs_rewrite"):
            print(f"{r['engine']} / our rewrite at batch {r['batch']}: {r['vs_rewrite']:.2f}x (best / best), "
                  f"{r['vs_rewrite_paired']:.2f}x (paired, median of rounds)")
    if peer:
        print(f"ours fp32 / llama.cpp F32 at batch 1: {result['ours_fp32_vs_llama_cpp_f32']:.0%} (best / best); "
              f"round by round {', '.join(f'{r:.0%}' for r in per_round)}, median {float(np.median(per_round)):.0%}")
    for engine, p in prefill.items():
        vs = f", {p['vs_llama_cpp_f32']:.2f}x llama.cpp F32 (median of rounds)" if "vs_llama_cpp_f32" in p else ""
        print(f"prefill {engine}: {p['prompt_tokens']} tokens at {p['tokens_per_second']:.0f} tokens/s{vs}")
    print(f"written to {args.out}")
    return 0


def device_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """(read + write) bytes/s of a jitted elementwise pass over an ``nbytes`` array on jax's default
    device: that device's memory roofline (on a GPU, HBM; on a CPU, what XLA's own loops get)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones(nbytes // 4, jnp.float32)
    step = jax.jit(lambda a: a + 1)
    step(x).block_until_ready()
    return 2 * x.nbytes / min(_timed(lambda: step(x).block_until_ready()) for _ in range(repeats))


def step_read_bytes(lifted) -> int:
    """Bytes one decode step reads: every weight, but of an input embedding table only ``batch``
    rows (nothing, here) unless the output head is tied to it."""
    embeddings = {f"{n}.weight" for n, m in lifted.model.named_modules() if isinstance(m, torch.nn.Embedding)}
    tied = getattr(getattr(lifted.model, "config", None), "tie_word_embeddings", False)
    return sum(int(np.prod(w.shape)) * w.dtype.itemsize for k, w in lifted.weights.items()
               if tied or k not in embeddings)  # fmt: skip


PRESET_SHAPES = {"llama-3-8b": "scale.CONFIG (Llama-3-8B's config.json)"}


def preset_main(args) -> int:
    """Real widths on jax's default device, ours against transformers eager on the same device."""
    import jax
    import scale
    from transformers import AutoModelForCausalLM

    from bridge import checkpoints, cpu_kernels
    from bridge.files import atomic_write
    from bridge.generate import Generator
    from bridge.models import open_model

    if args.preset not in PRESET_SHAPES:
        print(f"--preset {args.preset!r}: this benchmark knows {', '.join(PRESET_SHAPES)}; pass one of those",
              file=sys.stderr)  # fmt: skip
        return 2
    if not 1 <= args.layers <= scale.CONFIG["num_hidden_layers"]:
        print(f"--layers {args.layers}: give 1 to {scale.CONFIG['num_hidden_layers']}", file=sys.stderr)
        return 2
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    where = f"{device.platform}: {device.device_kind}" + (f", {cpu_kernels.cpu_name()} ({cpu_kernels.cpu_isa()})" if on_cpu else "")
    slug = "".join(c if c.isalnum() else "-" for c in (cpu_kernels.cpu_isa() if on_cpu else device.device_kind).lower())
    out = args.out or str(Path(__file__).parent / "results" / f"decode_{args.preset}_{args.layers}l_{slug}.json")
    torch_device = "cpu" if on_cpu or not torch.cuda.is_available() else "cuda"
    ckpt = scale.write_checkpoint(checkpoints.cache_dir() / f"llama3-8b-shaped-{args.layers}l", layers=args.layers)
    bandwidth_now = memory_bandwidth if on_cpu else (lambda: {"best": device_bandwidth()})
    bandwidths = [bandwidth_now()["best"]]
    batches = [int(b) for b in args.batches.split(",")]
    n = args.new_tokens
    rng = np.random.default_rng(1)
    ids = rng.integers(0, scale.CONFIG["vocab_size"], args.prompt_tokens).tolist()
    long_ids = rng.integers(0, scale.CONFIG["vocab_size"], args.prefill_tokens).tolist()
    print(f"{args.preset} widths, {args.layers} layers, on {where}", file=sys.stderr, flush=True)

    runners, prefill_runners, info = {}, {}, {}
    engines = [("ours bf16", dict(dtype="bfloat16")), ("ours bf16, unrolled", dict(dtype="bfloat16", scan_layers=False)),
               ("ours int8 (weight-only)", dict(dtype="bfloat16", quantize="int8")),
               ("ours int8, unrolled", dict(dtype="bfloat16", quantize="int8", scan_layers=False))]  # fmt: skip
    for engine, kw in engines:
        t0 = time.perf_counter()
        lifted = open_model(str(ckpt), devices=1, scheme="replicated", with_tokenizer=False, **kw)
        load_s = time.perf_counter() - t0
        gen = Generator(lifted, stop_at_eos=False)
        nbytes = step_read_bytes(lifted)
        for batch in batches:
            first = gen.generate_ids([ids] * batch, n)  # compiles

            def run(gen=gen, batch=batch):
                r = gen.generate_ids([ids] * batch, n)
                return r.decode_tokens_per_second, r.token_ids[0]

            runners[(engine, batch)] = (run, nbytes)
            info[(engine, batch)] = dict(compile_seconds=first.compile_seconds, load_seconds=load_s,
                                         scan_layers=lifted.scan_layers)  # fmt: skip
        if engine == "ours bf16":
            gen.generate_ids([long_ids], 1)  # compiles
            prefill_runners[engine] = lambda gen=gen: args.prefill_tokens / gen.generate_ids([long_ids], 1).prefill_seconds
        print(f"  {engine}: loaded {load_s:.0f} s, compiled", file=sys.stderr, flush=True)

    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16).eval().to(torch_device)
    hf_bytes = sum(p.numel() * p.element_size() for p in hf.parameters()
                   if hf.config.tie_word_embeddings or p is not hf.get_input_embeddings().weight)  # fmt: skip

    def sync():
        if torch_device == "cuda":
            torch.cuda.synchronize()

    for batch in batches:
        def run_hf(batch=batch):
            x = torch.tensor([ids] * batch, device=torch_device)
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False)  # fmt: skip
            sync()
            return batch * n / (time.perf_counter() - t0), out[0, len(ids):].tolist()  # prefill included: HF's own generate

        run_hf()  # warm-up (CUDA kernels, allocator)
        runners[("HF transformers eager bf16", batch)] = (run_hf, hf_bytes)

    def hf_prefill():
        x = torch.tensor([long_ids], device=torch_device)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            hf(x)
        sync()
        return args.prefill_tokens / (time.perf_counter() - t0)

    hf_prefill()
    prefill_runners["HF transformers eager bf16"] = hf_prefill

    best, prefill_rates = {}, {}
    for round_ in range(args.repeats):
        bandwidths.append(bandwidth_now()["best"])
        for key, (run, _) in runners.items():
            rate, tokens = run()
            if key not in best or rate > best[key][0]:
                best[key] = (rate, tokens)
        for engine, run in prefill_runners.items():
            prefill_rates.setdefault(engine, []).append(run())
        print(f"  round {round_ + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    bandwidth = max(bandwidths)
    hf_tokens = best[("HF transformers eager bf16", 1)][1] if 1 in batches else None
    rows = []
    for (engine, batch), (rate, tokens) in best.items():
        nbytes = runners[(engine, batch)][1]
        roof = bandwidth / nbytes * batch
        hf_rate = best[("HF transformers eager bf16", batch)][0]
        # bf16 greedy on random weights: near-tied logits can flip an argmax between two correct
        # programs, so the agreement is reported as a count of leading tokens, not asserted.
        same = next((i for i, (a, b) in enumerate(zip(tokens, hf_tokens)) if a != b), len(tokens)) if hf_tokens else None
        rows.append({"engine": engine, "batch": batch, "tokens_per_second": rate, "step_read_bytes": nbytes,
                     "roofline_tokens_per_second": roof, "fraction_of_roofline": rate / roof,
                     "vs_hf_eager": rate / hf_rate, "leading_tokens_equal_to_hf_batch1": same,
                     "token_ids": tokens, **info.get((engine, batch), {})})  # fmt: skip
    prefill = {e: {"prompt_tokens": args.prefill_tokens, "tokens_per_second": max(r), "per_round": r}
               for e, r in prefill_rates.items()}  # fmt: skip
    result = {
        "device": {"platform": device.platform, "kind": device.device_kind, "jax": jax.__version__,
                   "torch": torch.__version__, "torch_device": torch_device, "host_cpu": cpu_kernels.cpu_name(),
                   "host_cpu_isa": cpu_kernels.cpu_isa(), "host_cpus": os.cpu_count()},  # fmt: skip
        "model": f"{args.preset} widths, {args.layers} of {scale.CONFIG['num_hidden_layers']} layers, random bf16 weights",
        "prompt_tokens": len(ids), "new_tokens": n, "rounds": args.repeats,
        "memory_bandwidth_bytes_per_second": bandwidth, "memory_bandwidth_per_round": bandwidths,
        "rows": rows, "prefill": prefill,
    }
    with atomic_write(out) as fh:
        json.dump(result, fh, indent=2)
    print(f"{result['model']} on {where}; memory bandwidth {bandwidth / 1e9:.0f} GB/s "
          f"(jax {jax.__version__}, torch {torch.__version__} on {torch_device}); roofline = bandwidth / step bytes x batch")  # fmt: skip
    print(f"{'engine':<28} {'batch':>5} {'tok/s':>8} {'step MB':>8} {'of roofline':>11} {'vs HF':>6} {'=HF':>4} {'compile s':>9}")
    for r in rows:
        print(f"{r['engine']:<28} {r['batch']:>5} {r['tokens_per_second']:>8.1f} {r['step_read_bytes'] / 1e6:>8.0f} "
              f"{r['fraction_of_roofline']:>11.0%} {r['vs_hf_eager']:>5.2f}x {str(r['leading_tokens_equal_to_hf_batch1']):>4} "
              f"{r.get('compile_seconds', 0):>9.1f}")  # fmt: skip
    for engine, p in prefill.items():
        print(f"prefill {engine}: {p['prompt_tokens']} tokens at {p['tokens_per_second']:.0f} tokens/s")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
