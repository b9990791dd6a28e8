"""Llama-3-8B at its real size on this machine (issue 30): load time, peak RSS, compile time, prefill
and decode tokens/s for bf16 and int8 on 1 device, and int8 under tp on 8 simulated devices.

The checkpoint is Llama-3-8B's shape (32 layers, hidden 4096, intermediate 14336, 32 q / 8 kv heads,
vocab 128256) with random bf16 weights, written once as 9 safetensors shards with an index into the
cache (``$TORCHAX_BRIDGE_CACHE/llama3-8b-shaped``, 15 GB; tensor by tensor, never the whole model in
memory). Each case is one ``torchax-bridge generate`` in a fresh process (what a user runs), with
its peak RSS (``VmHWM``, read by a watcher) beside the bytes it placed; copy bandwidth is measured
in the same run for the decode roofline (bytes of weights per token / bandwidth). Writes
``benchmarks/results/scale.json`` and prints a table.

    python benchmarks/scale.py [--cases bf16,int8,int8_tp8] [--new-tokens 16] [--prompt-len 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
              intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
              max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
              bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16",
              rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"})  # fmt: skip
CASES = {
    "bf16": ["--dtype", "bfloat16", "--devices", "1", "--scheme", "replicated"],
    "int8": ["--quantize", "int8", "--devices", "1", "--scheme", "replicated"],
    "int8_tp8": ["--quantize", "int8", "--devices", "8", "--scheme", "tp"],
}


def shapes(layers: int | None = None) -> dict[str, tuple[int, ...]]:
    import torch
    import transformers as T

    config = T.LlamaConfig(**{k: v for k, v in config_with(layers).items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in T.LlamaForCausalLM(config).state_dict().items()}


def config_with(layers: int | None) -> dict:
    """The 8B config, with ``layers`` of its 32 decoder layers when given (real widths, less depth)."""
    return CONFIG if layers is None else {**CONFIG, "num_hidden_layers": layers}


def write_checkpoint(dst: Path, shard_bytes: int = 1800 << 20, layers: int | None = None) -> Path:
    """Random bf16 weights in the 8B layout (``layers`` of its decoder layers when given), shard by
    shard (one shard in memory at a time), atomically."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from bridge.files import atomic_directory

    if (dst / "config.json").is_file():
        return dst
    rng = np.random.default_rng(0)
    # 8 billion normals take minutes on two cores: each tensor is a window of one 64 MiB pool of
    # normal(0, 0.02) values at a random offset (the weights' values do not matter to the figures).
    pool = (rng.standard_normal(1 << 25, dtype=np.float32) * np.float32(0.02)).astype(ml_dtypes.bfloat16)
    names = shapes(layers)
    groups, size = [[]], 0
    for name, shape in names.items():
        nbytes = int(np.prod(shape)) * 2
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    with atomic_directory(dst) as tmp:
        for i, group in enumerate(groups, 1):
            fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            shard = {}
            for name in group:
                shape = names[name]
                if len(shape) == 1:  # norm scales
                    a = np.ones(shape, np.float32)
                    shard[name] = a.astype(ml_dtypes.bfloat16)
                else:
                    shard[name] = np.resize(np.roll(pool, int(rng.integers(pool.size))), shape)
                weight_map[name] = fname
                total += shard[name].nbytes
            save_file(shard, str(tmp.path / fname), metadata={"format": "pt"})
            print(f"  wrote {fname}", file=sys.stderr, flush=True)
            del shard
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp.path / "model.safetensors.index.json").write_text(json.dumps(index))
        (tmp.path / "config.json").write_text(json.dumps(config_with(layers), indent=2))
        tmp.commit()
    return dst


def copy_bandwidth(nbytes: int = 1 << 30, rounds: int = 5) -> float:
    """Bytes/s of a large numpy copy (read + write counted once each): the machine's memory roofline."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * nbytes / (time.perf_counter() - t0))
    return best


def peak_rss(pid: int, stop: threading.Event, out: dict) -> None:
    import psutil

    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            for p in [proc, *proc.children(recursive=True)]:
                out["peak"] = max(out.get("peak", 0), p.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.2)


def run_case(ckpt: Path, case: str, prompt_len: int, new_tokens: int) -> dict:
    ids = ",".join(str(i) for i in np.random.default_rng(1).integers(0, CONFIG["vocab_size"], prompt_len))
    cmd = [sys.executable, "-m", "bridge", "generate", "--checkpoint", str(ckpt), "--input-ids", ids,
           "--max-new-tokens", str(new_tokens), "--json", *CASES[case]]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    stop, rss = threading.Event(), {}
    watcher = threading.Thread(target=peak_rss, args=(proc.pid, stop, rss), daemon=True)
    watcher.start()
    out, err = proc.communicate()
    stop.set()
    wall = time.perf_counter() - t0
    row = {"case": case, "command": " ".join(cmd[2:4] + CASES[case]), "exit": proc.returncode, "wall_seconds": wall,
           "peak_rss_bytes": rss.get("peak", 0)}  # fmt: skip
    if proc.returncode != 0:
        row["error"] = (err.strip().splitlines() or ["?"])[-1]
        return row
    result = json.loads(out.strip().splitlines()[-1])
    row.update({k: result[k] for k in ("compile_seconds", "prefill_seconds", "decode_tokens_per_second")})
    row["prefill_tokens_per_second"] = prompt_len / result["prefill_seconds"]
    decode_s = (new_tokens - 1) / result["decode_tokens_per_second"] if result["decode_tokens_per_second"] else 0
    row["load_seconds_about"] = wall - result["compile_seconds"] - result["prefill_seconds"] - decode_s
    return row


def main() -> None:
    from bridge import checkpoints, cpu_kernels

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="bf16,int8,int8_tp8")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    args = ap.parse_args()
    ckpt = write_checkpoint(checkpoints.cache_dir() / "llama3-8b-shaped")
    bw = copy_bandwidth()
    params = sum(int(np.prod(s)) for s in shapes().values())
    linear = sum(int(np.prod(s)) for n, s in shapes().items() if len(s) == 2)  # int8 where 2-D
    weight_bytes = {"bf16": 2 * params, "int8": linear + 2 * (params - linear) + 4 * sum(
        s[0] for s in shapes().values() if len(s) == 2)}  # fmt: skip
    weight_bytes["int8_tp8"] = weight_bytes["int8"]
    rows = []
    for case in args.cases.split(","):
        print(f"[{case}] running ...", file=sys.stderr, flush=True)
        row = run_case(ckpt, case, args.prompt_len, args.new_tokens)
        row["weight_bytes"] = weight_bytes[case]
        row["peak_rss_over_weights"] = row["peak_rss_bytes"] / weight_bytes[case]
        if row.get("decode_tokens_per_second") and case != "int8_tp8":  # 8 simulated devices share 2 cores
            roof = bw / weight_bytes[case]
            row["decode_roofline_tokens_per_second"] = roof
            row["decode_fraction_of_roofline"] = row["decode_tokens_per_second"] / roof
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    result = {"cpu": cpu_kernels.cpu_name(), "isa": cpu_kernels.cpu_isa(), "cores": os.cpu_count(),
              "copy_bandwidth_bytes_per_s": bw, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "rows": rows}  # fmt: skip
    out = ROOT / "benchmarks" / "results" / "scale.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(f"Llama-3-8B-shaped, {result['cpu']} ({result['isa']}), {result['cores']} cores, copy {bw / 1e9:.1f} GB/s")
    print("| case | exit | peak RSS GiB | / weights | load s | compile s | prefill tok/s | decode tok/s | of roofline |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        f = lambda k, fmt="{:.1f}": fmt.format(r[k]) if k in r else "-"  # noqa: E731
        print(f"| {r['case']} | {r['exit']} | {r['peak_rss_bytes'] / 2**30:.1f} | {r['peak_rss_over_weights']:.2f} | "
              f"{f('load_seconds_about')} | {f('compile_seconds')} | {f('prefill_tokens_per_second')} | "
              f"{f('decode_tokens_per_second', '{:.2f}')} | {f('decode_fraction_of_roofline', '{:.0%}')} |"
              + (f" {r['error']}" if "error" in r else ""))  # fmt: skip


if __name__ == "__main__":
    main()
