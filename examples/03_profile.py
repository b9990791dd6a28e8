"""Profile: compile outside the trace, then trace a few steps into a TensorBoard log directory, with
each model layer named (layers.3.self_attn, ...) and each step annotated.

    python examples/03_profile.py --logdir /tmp/trace
    tensorboard --logdir /tmp/trace          # needs the profile extra: pip install '.[profile]'
"""

import argparse

from bridge import devices

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--checkpoint", default="smollm2")
ap.add_argument("--devices", type=int, default=3)
ap.add_argument("--scheme", default="tp")
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--mode", choices=["forward", "decode"], default="forward")
ap.add_argument("--logdir", default="/tmp/torchax-bridge-trace")
args = ap.parse_args()
devs = devices.setup(args.devices)

from bridge import profiling  # noqa: E402
from bridge.models import open_model  # noqa: E402

lifted = open_model(args.checkpoint, devices=devs, scheme=args.scheme, with_tokenizer=False)
summary = profiling.profile(lifted, args.mode, args.steps, args.logdir)
print(profiling.format_summary(summary))
