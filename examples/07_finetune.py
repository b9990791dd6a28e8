"""Fine-tune SmolLM2 on JAX: the torch model lifted, AdamW (optax) steps sharded by a scheme, the
loss falling, the trained weights generating. The text is the Zen of Python, which ships with every
Python install (``import this``).

    python examples/07_finetune.py [--steps 10] [--devices 2 --scheme fsdp] [--remat] [--out DIR]

The same as a command: ``torchax-bridge train --data FILE.txt --steps N --out DIR`` (loss.csv,
loss.png, a checkpoint ``generate --checkpoint DIR`` loads, resumable).
"""

import argparse
import codecs
import contextlib
import io

with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen; its text is this.s, rot13
    import this

from bridge import devices

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--devices", type=int, default=1)
ap.add_argument("--scheme", default="fsdp")
ap.add_argument("--lr", type=float, default=1e-4)
ap.add_argument("--remat", action="store_true")
args = ap.parse_args()
devs = devices.setup(args.devices)

import time  # noqa: E402

import numpy as np  # noqa: E402
import optax  # noqa: E402

from bridge.generate import Generator  # noqa: E402
from bridge.models import open_model  # noqa: E402
from bridge.train import Trainer, batch_at, pack  # noqa: E402

ZEN = codecs.decode(this.s, "rot13")

lifted = open_model("smollm2", devices=devs, scheme=args.scheme)
windows = pack(lifted.tokenizer.encode(ZEN), 64)
print(f"the Zen of Python: {len(windows)} windows of 64 tokens; {args.scheme} on {dict(lifted.mesh.shape)}")

trainer = Trainer(lifted, optax.adamw(args.lr), remat=args.remat)
state = trainer.init()
evaluate = lambda params: float(trainer.loss(params, trainer.put_batch(windows)))  # noqa: E731
before = evaluate(state.params)
for step in range(args.steps):
    t0 = time.perf_counter()
    state, loss = trainer.step(state, batch_at(windows, step, 2))
    print(f"step {step + 1:>3}: loss {float(loss):.4f} ({time.perf_counter() - t0:.2f} s)")
after = evaluate(state.params)
print(f"loss of the whole text: before {before:.4f}, after {after:.4f} nats per token")
b = trainer.state_bytes_per_device(state)
print(f"per device: parameters {b['params']:,} B, gradients {b['grads']:,} B, optimizer {b['optimizer']:,} B")

# The trained weights drive generation as they are (the same lifted model, new weights).
lifted.weights = {**lifted.weights, **state.params}
prompt = "Beautiful is better than"
ids = lifted.tokenizer.encode(prompt)
out = Generator(lifted).generate_ids([ids], 24).token_ids[0]
print(f"{prompt}{lifted.tokenizer.decode(out, skip_special_tokens=True)}")
assert after < before, "fine-tuning did not lower the loss"
print(f"loss fell by {np.log(before / after):.2f} in log space")
