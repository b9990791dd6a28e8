"""Generate text: jitted prefill + on-device decode loop with a donated KV cache, streamed.

    python examples/02_generate.py --prompt "What is the capital of France?"
    python examples/02_generate.py --devices 3 --scheme tp       # SmolLM2's 3 kv heads split 3 ways
"""

import argparse

from bridge import devices

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--checkpoint", default="smollm2")
ap.add_argument("--prompt", default="What is the capital of France?")
ap.add_argument("--devices", type=int, default=1)
ap.add_argument("--scheme", default="tp")
ap.add_argument("--max-new-tokens", type=int, default=48)
ap.add_argument("--temperature", type=float, default=0.0)
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()
devs = devices.setup(args.devices)

from bridge.generate import Generator, Sampling  # noqa: E402
from bridge.models import open_model  # noqa: E402

gen = Generator(open_model(args.checkpoint, devices=devs, scheme=args.scheme))
chat = gen.tokenizer is not None and bool(gen.tokenizer.chat_template)
print(f"> {args.prompt}")
result = gen.generate([args.prompt], args.max_new_tokens, Sampling(args.temperature), args.seed, chat=chat,
                        stream=lambda row, piece: print(piece, end="", flush=True))  # fmt: skip
print(f"\n[compile {result.compile_seconds:.1f} s, prefill {result.prefill_seconds * 1000:.0f} ms, "
      f"decode {result.decode_tokens_per_second:.1f} tokens/s]")  # fmt: skip
