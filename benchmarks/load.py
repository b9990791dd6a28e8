"""Load time and host memory: SmolLM2 cold (dequantising the packaged GGUF) vs warm (the safetensors
cache), and loading straight onto a mesh (1 device; 8 devices under fsdp). Each case runs in a fresh
process so its peak RSS (``VmHWM``) is its own; the figure reported is the peak RSS growth during
the load. Library imports (torch, jax, transformers, gguf: several seconds, the same for every case)
happen before the clock starts and are reported on their own.
Simulated CPU devices live in host memory, so the placed weights themselves count: a scheme that
replicates a tensor on 8 devices holds it 8 times, which is why fsdp (every matrix split once) is the
one that shows the loader's own overhead on 8 devices. Writes
benchmarks/results/load.json and prints a table.

    python benchmarks/load.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASE = r"""
import json, os, sys, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, {root!r})
t_import = time.perf_counter()
import torch, jax, warnings
import gguf, transformers.models.llama.modeling_llama, transformers.models.auto.tokenization_auto
import sharding
from bridge import checkpoints
from bridge.lift import lift_checkpoint
warnings.simplefilter("ignore")
jax.devices()
import_seconds = time.perf_counter() - t_import

def vm(key):  # kB fields of /proc/self/status; VmHWM is this process's peak RSS (reset by exec)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

rss0 = vm("VmRSS")
t0 = time.perf_counter()
case = {case!r}
if case == "cold":
    loaded = checkpoints.load(str(checkpoints.smollm2_gguf()))
elif case == "warm":
    loaded = checkpoints.load("smollm2")
else:  # "direct_<scheme>_<devices>"
    _, scheme, n = case.split("_")
    lifted = lift_checkpoint(checkpoints.smollm2_dir(), sharding.mesh_for(scheme, int(n)), scheme)
    jax.block_until_ready(list(lifted.weights.values()))
seconds = time.perf_counter() - t0
print(json.dumps({{"seconds": seconds, "import_seconds": import_seconds, "peak_rss_growth_bytes": vm("VmHWM") - rss0}}))
"""


def run(case: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CASE.format(root=str(ROOT), case=case)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    from bridge import checkpoints
    from bridge.files import atomic_write

    cache = checkpoints.smollm2_dir()  # make sure the cache exists before timing "warm"
    size = sum(f.stat().st_size for f in cache.glob("*.safetensors"))
    results = {"checkpoint_bytes": size, "cases": {c: run(c) for c in ("cold", "warm", "direct_replicated_1", "direct_fsdp_8")}}
    cold, warm = results["cases"]["cold"]["seconds"], results["cases"]["warm"]["seconds"]
    results["warm_speedup"] = cold / warm
    for c in results["cases"].values():
        c["peak_rss_over_checkpoint"] = c["peak_rss_growth_bytes"] / size
    out = Path(__file__).parent / "results" / "load.json"
    with atomic_write(out) as fh:
        json.dump(results, fh, indent=2)
    print(f"SmolLM2 safetensors checkpoint: {size / 1e6:.0f} MB")
    print(f"{'case':<20} {'load s':>7} {'imports s':>10} {'peak RSS growth':>16} {'x checkpoint':>13}")
    for name, c in results["cases"].items():
        print(f"{name:<20} {c['seconds']:>7.2f} {c['import_seconds']:>10.2f} {c['peak_rss_growth_bytes'] / 1e6:>13.0f} MB "
              f"{c['peak_rss_over_checkpoint']:>12.2f}x")  # fmt: skip
    print(f"warm is {results['warm_speedup']:.1f}x faster than cold; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
