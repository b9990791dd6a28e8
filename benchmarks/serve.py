"""A bounded load test of ``serve`` on loopback, beside ``generate`` at batch 8 in the same run.

SmolLM2-135M-Instruct (fp32, 1 CPU device), the server in this process on a free loopback port
(``bridge.server.serve``, ``--max-batch`` slots). ``--clients`` threads send ``--requests`` streamed
``/v1/completions`` requests in all, each the next as soon as its last ended: prompts of 16-320
tokens and answers of 16-128 tokens, drawn from a fixed seed, greedy, ``ignore_eos`` (every answer
as long as asked). It stops by itself when every request has ended, and reports requests/s, output
tokens/s, time to first token and inter-token latency (median and p99), and the output tokens/s as
a ratio of ``generate`` at batch 8 in the same run, two ways:
  * on the same work: the same 64 requests through ``Generator.generate_ids`` in batches of 8, in
    order (static batching: each batch padded to its longest prompt, run to its longest answer),
    counting the tokens asked for over the wall time, prefill included -- what a user without the
    server would do;
  * decode only: ``generate_ids`` at batch 8 with 32-token prompts and 128 new tokens, its decode
    loop's tokens/s (no prefill) -- the ceiling of one step of 8 rows.
Writes ``benchmarks/results/serve.json``.

    python benchmarks/serve.py [--clients 16] [--requests 64] [--max-batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
import urllib.request
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

TEXT = ("The history of the river town begins with a ferry, a mill and a market where farmers from the valley "
        "sold grain, wool and apples. Over two centuries the town grew along the water, built a stone bridge, "
        "a school and a library, and survived floods, fires and a long decline when the railway passed it by. ")  # fmt: skip


def stream_one(url: str, prompt: list, max_tokens: int) -> dict:
    """One streamed completion: (time to first token, the gaps between later tokens, tokens)."""
    body = json.dumps({"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "ignore_eos": True}).encode()  # fmt: skip
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    stamps = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - t0, "gaps": list(np.diff(stamps)), "tokens": max_tokens, "end": stamps[-1]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-seq", type=int, default=512)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    args = ap.parse_args()
    if not 1 <= args.clients <= 256 or args.requests < args.clients:
        raise SystemExit("benchmarks/serve.py: --clients in [1, 256] and --requests >= --clients")

    from bridge import cpu_kernels, server
    from bridge.generate import Generator
    from bridge.models import open_model
    from bridge.serving import Engine

    lifted = open_model("smollm2", devices=1, scheme="replicated")
    tokenizer = lifted.tokenizer
    text_ids = tokenizer.encode(TEXT * 8)
    rng = np.random.default_rng(0)
    work = [(text_ids[: int(rng.integers(16, 321))], int(rng.integers(16, 129))) for _ in range(args.requests)]

    gen = Generator(lifted, stop_at_eos=False, after_request=())
    prompt8 = [text_ids[:32]] * 8
    gen.generate_ids(prompt8, 128)  # compiles

    def generate_rate() -> float:
        return max(gen.generate_ids(prompt8, 128).decode_tokens_per_second for _ in range(2))

    def generate_same_work() -> float:
        asked, t0 = 0, time.perf_counter()
        for i in range(0, len(work), 8):
            batch = work[i : i + 8]
            gen.generate_ids([p for p, _ in batch], max(n for _, n in batch))
            asked += sum(n for _, n in batch)
        return asked / (time.perf_counter() - t0)

    engine = Engine(lifted, slots=args.max_batch, max_seq=args.max_seq, queue_size=args.requests)
    t0 = time.perf_counter()
    engine.warm()
    print(f"engine compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    ready = threading.Event()
    where = {}

    def on_ready(port, stop):
        where.update(url=f"http://127.0.0.1:{port}", stop=stop)
        ready.set()

    thread = threading.Thread(target=server.serve, args=(engine, "smollm2", "127.0.0.1", 0),
                              kwargs=dict(log=None, ready=on_ready), daemon=True)  # fmt: skip
    thread.start()
    ready.wait(300)
    url = where["url"]
    stream_one(url, text_ids[:16], 4)  # first request over the socket

    before = generate_rate()
    generate_same_work()  # compiles its shapes
    static = generate_same_work()
    results, errors, lock = [], [], threading.Lock()
    todo = iter(work)

    def client():
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            try:
                r = stream_one(url, *item)
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(repr(e))
                continue
            with lock:
                results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = generate_rate()
    where["stop"]()
    thread.join(120)

    ttft = np.asarray([r["ttft"] for r in results])
    gaps = np.asarray([g for r in results for g in r["gaps"]])
    tokens = sum(r["tokens"] for r in results)
    generate8 = (before + after) / 2
    out = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu": cpu_kernels.cpu_name(),
                    "cpu_isa": cpu_kernels.cpu_isa(), "kernel": cpu_kernels.isa() or cpu_kernels.why_unavailable()},
        "model": "SmolLM2-135M-Instruct fp32, 1 device",
        "clients": args.clients, "requests": args.requests, "slots": args.max_batch, "max_seq": args.max_seq,
        "errors": errors,
        "wall_seconds": wall,
        "requests_per_second": len(results) / wall,
        "output_tokens_per_second": tokens / wall,
        "ttft_seconds": {"median": float(np.median(ttft)), "p99": float(np.percentile(ttft, 99))},
        "inter_token_seconds": {"median": float(np.median(gaps)), "p99": float(np.percentile(gaps, 99))},
        "generate_batch8_same_work_tokens_per_second": static,
        "vs_generate_batch8_same_work": tokens / wall / static,
        "generate_batch8_decode_only_tokens_per_second": {"before": before, "after": after},
        "vs_generate_batch8_decode_only": tokens / wall / generate8,
        "engine_steps": engine.steps,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, args.out)
    print(f"CPU: {out['machine']['cpu']} ({out['machine']['cpu_isa']}); kernels {out['machine']['kernel']}")
    print(f"{args.clients} clients, {len(results)} requests ({len(errors)} failed), {args.max_batch} slots: "
          f"{out['requests_per_second']:.2f} requests/s, {out['output_tokens_per_second']:.1f} output tokens/s")
    print(f"  = {out['vs_generate_batch8_same_work']:.2f}x generate in batches of 8 on the same requests "
          f"({static:.1f} tokens/s, prefill included); {out['vs_generate_batch8_decode_only']:.2f}x generate batch 8's "
          f"decode loop alone ({before:.1f} / {after:.1f} tokens/s before / after)")  # fmt: skip
    print(f"time to first token: median {out['ttft_seconds']['median'] * 1000:.0f} ms, p99 "
          f"{out['ttft_seconds']['p99'] * 1000:.0f} ms; inter-token: median "
          f"{out['inter_token_seconds']['median'] * 1000:.1f} ms, p99 {out['inter_token_seconds']['p99'] * 1000:.1f} ms")  # fmt: skip
    print(f"wrote {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
