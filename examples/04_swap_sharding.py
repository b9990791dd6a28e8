"""Swap sharding schemes: define a rule table here, run it beside the built-in `tp`, print both.

A scheme is data: an ordered table of (parameter-name regex -> PartitionSpec entries), first match
wins. This one shards only the MLPs (column/row parallel) and leaves attention replicated.

    python examples/04_swap_sharding.py --checkpoint tiny-llama
"""

import argparse

from bridge import devices

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--checkpoint", default="smollm2")
ap.add_argument("--devices", type=int, default=8)
args = ap.parse_args()
devs = devices.setup(args.devices)

import warnings  # noqa: E402

import numpy as np  # noqa: E402

import sharding  # noqa: E402
from bridge import hlo  # noqa: E402
from bridge.models import open_model  # noqa: E402

MLP_ONLY = sharding.Scheme(
    "mlp_only",
    rules=(
        (r"\.(gate_proj|up_proj|dense_h_to_4h)\.weight$", ("model",)),  # column-parallel
        (r"\.(down_proj|dense_4h_to_h)\.weight$", (None, "model")),  # row-parallel
        (r".*", ()),  # everything else replicated
    ),
    mesh=(("model", -1),),
    description="MLPs tensor-parallel, attention and embeddings replicated",
)

ids = np.arange(1, 33, dtype=np.int32)[None]
results = {}
for scheme in (MLP_ONLY, sharding.get_scheme("tp")):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lifted = open_model(args.checkpoint, devices=devs, scheme=scheme, fallback="replicate", with_tokenizer=False)
    stats = hlo.compiled_stats(lifted.compiled_forward(ids))
    rep = lifted.report()
    results[scheme.name] = np.asarray(lifted.forward(ids))
    print(f"== {scheme.name}: {scheme.description}")
    print(f"   parameter bytes per device {rep['param_bytes_per_device']:,} of {rep['param_bytes_total']:,} "
          f"({rep['replicated_fraction']:.0%} replicated)")  # fmt: skip
    print(f"   collectives per forward: {hlo.format_collectives(stats['collectives'])}")
a, b = results.values()
print(f"logits agree: max relative difference {np.abs(a - b).max() / np.abs(b).max():.1e}")
