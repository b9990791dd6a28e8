"""Train a vision model written in torch, on JAX: a small ResNet-style CNN with BatchNorm in train
mode, your own loss written in torch, AdamW (optax), the batch split over devices (dp). The data is
synthetic and learnable: 32x32 images of one of 10 oriented stripe patterns, with noise.

    python examples/08_train_vision.py [--steps 30] [--devices 2]

BatchNorm normalises by each batch and its running statistics are part of the training state, as in
torch; ``lifted.to_torch()`` writes the trained weights and statistics back into the torch module,
which then classifies held-out images in eager torch.
"""

import argparse

from bridge import devices

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--steps", type=int, default=30)
ap.add_argument("--devices", type=int, default=1)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--lr", type=float, default=3e-3)
args = ap.parse_args()
devs = devices.setup(args.devices)

import time  # noqa: E402

import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import sharding  # noqa: E402
from bridge.lift import lift  # noqa: E402
from bridge.train import Trainer, torch_loss  # noqa: E402


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.skip(x))


class SmallResNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.stages = nn.Sequential(Block(16, 32, 2), Block(32, 64, 2))
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def stripes(n, rng):
    """``n`` images of 10 classes: stripes at angle 18 * class degrees, random phase, noise."""
    labels = rng.integers(0, 10, n)
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    angles = np.deg2rad(18.0 * labels)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    wave = np.sin(2 * np.pi * 4 * (xx * np.cos(angles) + yy * np.sin(angles)) + phase)
    images = np.repeat(wave[:, None], 3, axis=1) + 0.5 * rng.standard_normal((n, 3, 32, 32))
    return torch.tensor(images, dtype=torch.float32), torch.tensor(labels)


def cross_entropy(logits, batch):  # the loss, in torch: batch is (images, labels)
    return F.cross_entropy(logits, batch[1])


torch.manual_seed(0)
rng = np.random.default_rng(0)
model = SmallResNet().train()
lifted = lift(model, sharding.mesh_for("dp", len(devs), devices=devs), "dp")
trainer = Trainer(lifted, optax.adamw(args.lr), loss=torch_loss(cross_entropy))
state = trainer.init()
print(f"SmallResNet, {sum(p.numel() for p in model.parameters()):,} parameters; dp on {dict(lifted.mesh.shape)}; "
      f"{len(trainer.buffer_names)} buffers in the state (BatchNorm statistics)")
losses = []
for step in range(args.steps):
    t0 = time.perf_counter()
    state, loss = trainer.step(state, stripes(args.batch, rng))
    losses.append(float(loss))
    if step % 5 == 0 or step == args.steps - 1:
        print(f"step {step + 1:>3}: loss {losses[-1]:.4f} ({time.perf_counter() - t0:.2f} s)")

# The trained weights and statistics back in the torch module; held-out accuracy in eager torch.
lifted.weights.update({**state.params, **state.buffers})
lifted.to_torch().eval()
images, labels = stripes(512, np.random.default_rng(1))
with torch.no_grad():
    accuracy = float((model(images).argmax(-1) == labels).float().mean())
first, last = np.mean(losses[:3]), np.mean(losses[-3:])
print(f"loss {first:.3f} -> {last:.3f} (mean of the first and last 3 steps); held-out accuracy {accuracy:.1%} "
      f"(chance 10%)")
assert last < first, "training did not lower the loss"
