"""Your own PyTorch model on JAX: a small vision transformer written here, lifted, sharded on 8
devices by a rule table written here, jitted, checked against eager torch module by module, and
profiled.

Nothing in this file is a language model or comes from a model library: the parameter names
(``stem``, ``mixer.qkv``, ``ffn.expand``...) are this script's own, and so is the rule table.

    python examples/06_your_own_module.py [--devices 8] [--logdir /tmp/vit-trace]
"""

import argparse
import tempfile

from bridge import devices

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--devices", type=int, default=8)
ap.add_argument("--logdir", default=None, help="trace directory (default: a temporary one)")
args = ap.parse_args()
devs = devices.setup(args.devices)  # before jax starts: on CPU, that many simulated devices

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import sharding  # noqa: E402
from bridge.check import check_module, format_check  # noqa: E402
from bridge.lift import lift  # noqa: E402
from bridge.profiling import format_summary, profile_call  # noqa: E402


# --- the model: plain torch ------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, w))


class FeedForward(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.expand = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.contract = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.contract(self.act(self.expand(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.pre_mix, self.pre_ffn = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mixer, self.ffn = Attention(width, heads), FeedForward(width)

    def forward(self, x):
        x = x + self.mixer(self.pre_mix(x))
        return x + self.ffn(self.pre_ffn(x))


class TinyViT(nn.Module):
    def __init__(self, image=32, patch=4, width=64, heads=4, depth=4, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, patch, patch)
        self.where = nn.Parameter(torch.randn(1, (image // patch) ** 2, width) * 0.02)
        self.trunk = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width)
        self.classify = nn.Linear(width, classes)

    def forward(self, pixels, *, return_tokens: bool = False):
        x = self.stem(pixels).flatten(2).transpose(1, 2) + self.where
        for block in self.trunk:
            x = block(x)
        x = self.final_norm(x)
        logits = self.classify(x.mean(1))
        return {"logits": logits, "tokens": x} if return_tokens else logits


# --- the sharding: a rule table (regex on parameter names -> PartitionSpec entries) ----------------
# Megatron on the "model" axis: the projections that fan out (qkv, expand) split their output
# rows, the ones that fan in (out, contract) split their input columns; the batch goes on "data".
RULES = [
    (r"mixer\.qkv\.(weight|bias)$", ("model",)),
    (r"ffn\.expand\.(weight|bias)$", ("model",)),
    (r"mixer\.out\.weight$", (None, "model")),
    (r"ffn\.contract\.weight$", (None, "model")),
    (r".*", ()),  # everything else replicated
]
scheme = sharding.scheme_from_rows("vit_tp", RULES, mesh=(("data", 2), ("model", -1)), batch_axes=("data",))
mesh = sharding.mesh_for(scheme, len(devs), devices=devs)

torch.manual_seed(0)
model = TinyViT().eval()
pixels = torch.randn(8, 3, 32, 32)

# --- lift, shard, jit ----------------------------------------------------------------------------
lifted = lift(model, mesh, scheme)
report = lifted.report()
print(f"mesh {report['mesh']}: {report['param_bytes_per_device']:,} parameter bytes per device "
      f"of {report['param_bytes_total']:,}")  # fmt: skip
print(sharding.format_report(report, max_rows=12))

out = lifted(pixels, return_tokens=True)  # compiled once for this shape; a dict, like the module's
with torch.no_grad():
    ref = model(pixels, return_tokens=True)
for key in ("logits", "tokens"):
    err = np.abs(np.asarray(out[key]) - ref[key].numpy()).max() / np.abs(ref[key].numpy()).max()
    print(f"{key}: shape {list(out[key].shape)}, sharding {out[key].sharding.spec}, max rel. error vs eager {err:.1e}")

# --- check: every submodule vs eager torch, on 1 device and under the table ------------------------
result = check_module(model, (pixels,), mesh=mesh, scheme=scheme)
print(format_check(result, max_rows=12))
assert result.ok, "the lifted model diverges from eager torch"

# --- profile: time per block in the jitted forward --------------------------------------------------
logdir = args.logdir or tempfile.mkdtemp(prefix="vit-trace-")
summary = profile_call(lifted, (pixels,), steps=3, logdir=logdir)
print(format_summary(summary))
