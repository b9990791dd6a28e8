"""A tiny Grok-1-style MoE (8 experts, top 2) under tensor parallelism and expert parallelism.

Under `tp` each expert's FFN is split over all devices; under `ep` each device holds whole experts
(the expert dim is sharded), runs them on every token, and one reduction combines the results.
Prints the collectives of one forward and the memory per device for each.

    python examples/05_moe_expert_parallel.py
"""

import argparse

from bridge import devices

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--preset", default="tiny-grok")
ap.add_argument("--devices", type=int, default=8)
args = ap.parse_args()
devs = devices.setup(args.devices)

import numpy as np  # noqa: E402

import sharding  # noqa: E402
from bridge import hlo  # noqa: E402
from bridge import checkpoints  # noqa: E402
from bridge.lift import lift  # noqa: E402

model = checkpoints.load(args.preset).model
ids = np.arange(1, 17, dtype=np.int32)[None].repeat(2, 0)
ref = lift(model, sharding.mesh_for("replicated", 1, devices=devs), "replicated").forward(ids)
for name in ("tp", "ep", "ep_tp"):
    lifted = lift(model, sharding.mesh_for(name, len(devs), devices=devs), name)
    stats = hlo.compiled_stats(lifted.compiled_forward(ids))
    expert = lifted.placement("model.layers.0.mlp.experts.gate_up_proj")
    out = np.asarray(lifted.forward(ids))
    print(f"== {name} (mesh {dict(lifted.mesh.shape)})")
    print(f"   experts.gate_up_proj {list(expert.shape)} spec {expert.spec} -> "
          f"{expert.shard_shape(dict(lifted.mesh.shape))} per device")  # fmt: skip
    print(f"   collectives: {hlo.format_collectives(stats['collectives'])}")
    print(f"   memory per device: parameters {lifted.report()['param_bytes_per_device']:,} B, "
          f"peak {stats['memory']['peak_bytes']:,} B; max rel diff vs 1 device "
          f"{np.abs(out - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max():.1e}")  # fmt: skip
