"""``torchax-bridge`` command line. Parses arguments before jax is imported, so ``--devices N`` can
still set the number of simulated CPU devices."""

from __future__ import annotations

import argparse
import json
import sys
import time

from bridge import devices as device_setup


class UsageError(ValueError):
    pass


def _common(p: argparse.ArgumentParser, scheme_default: str = "tp") -> None:
    p.add_argument("--checkpoint", default="smollm2",
                   help="'smollm2' (default, embedded), a HF checkpoint directory, a .gguf file, or a preset")
    p.add_argument("--devices", type=int, default=None,
                   help="number of devices for the mesh; on CPU, that many simulated devices (default: all)")
    p.add_argument("--scheme", default=scheme_default,
                   help="sharding scheme: a built-in name (see `torchax-bridge shardings --list`), "
                        "rules.py:NAME, or a JSON/YAML rule file (default: %(default)s)")
    p.add_argument("--mesh", default=None, help="mesh axis sizes, e.g. data=2,model=4 (default: the scheme's)")
    p.add_argument("--fallback", choices=["error", "replicate"], default="error",
                   help="when a rule does not fit a tensor (indivisible dim, split heads): fail (default) "
                        "or replicate that tensor with a warning")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: weight-only int8 with per-output-channel scales (grok-1's QuantizedWeight8bit)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchax-bridge",
        description="Run PyTorch model definitions on JAX: lift with torchax, shard by rule table, jit.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    f = sub.add_parser("forward", help="one jitted forward pass: shape, top-5 next tokens, timings")
    _common(f)
    src = f.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text to tokenize")
    src.add_argument("--input-ids", help="comma-separated token ids, e.g. 1,2,3")
    f.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to --prompt")
    f.add_argument("--save-logits", metavar="FILE.npy", help="write the logits [batch, seq, vocab] here")

    g = sub.add_parser("generate", help="generate text (jitted prefill + on-device decode loop)")
    _common(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt")
    src.add_argument("--batch-file", help="a file with one prompt per line, generated as one batch")
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--truncate", action="store_true", help="left-truncate a prompt too long for the context")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt instead of text")

    s = sub.add_parser("shardings", help="where each weight goes under a scheme, and what one forward costs")
    _common(s)
    s.add_argument("--list", action="store_true", help="list the built-in schemes and exit")
    s.add_argument("--seq", type=int, default=32, help="sequence length of the analysed forward")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--rows", type=int, default=None, help="show at most this many parameter rows")
    s.add_argument("--json", action="store_true")
    cmp = sub.add_parser("compare", help="sharding schemes side by side: time, memory, collectives, accuracy")
    _common(cmp)
    cmp.add_argument("--schemes", default="replicated,tp,fsdp,dp,dp_tp", help="comma-separated scheme names")
    cmp.add_argument("--batch", type=int, default=8)
    cmp.add_argument("--seq", type=int, default=64, help="tokens per row (forward) or KV cache length (decode)")
    cmp.add_argument("--mode", choices=["forward", "decode"], default="forward")
    cmp.add_argument("--repeats", type=int, default=5, help="timed runs per scheme (median, min, max)")
    cmp.add_argument("--out", default="compare-out", help="directory for compare.csv, compare.md, compare.png")

    prof = sub.add_parser("profile", help="trace K warm steps into a TensorBoard / xprof log directory")
    _common(prof)
    prof.add_argument("--steps", type=int, default=3)
    prof.add_argument("--logdir", default="/tmp/torchax-bridge-trace")
    prof.add_argument("--mode", choices=["forward", "decode"], default="forward")
    prof.add_argument("--batch", type=int, default=1)
    prof.add_argument("--seq", type=int, default=32)

    pl = sub.add_parser("plan", help="per-device memory and collectives of a model on a mesh, no weights allocated")
    what = pl.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", help="a model_torch preset, e.g. grok-1, llama-3-8b, neox-20b")
    what.add_argument("--checkpoint", help="a HF checkpoint directory (only its config.json is read)")
    pl.add_argument("--devices", type=int, default=8)
    pl.add_argument("--mesh", default=None)
    pl.add_argument("--scheme", default="tp")
    pl.add_argument("--fallback", choices=["error", "replicate"], default="error")
    pl.add_argument("--dtype", choices=["bfloat16", "int8", "float32"], default="bfloat16")
    pl.add_argument("--mode", choices=["forward", "decode"], default="decode")
    pl.add_argument("--batch", type=int, default=1)
    pl.add_argument("--seq", type=int, default=2048, help="tokens (forward) or KV-cache length (decode)")
    pl.add_argument("--device-memory", default=None, help="e.g. 80GiB: say whether the plan fits")
    pl.add_argument("--json", action="store_true")

    la = sub.add_parser("launch", help="run a command in several local processes joined by jax.distributed")
    la.add_argument("--processes", type=int, default=2)
    la.add_argument("--devices-per-process", type=int, default=4)
    la.add_argument("--timeout", type=float, default=60.0, help="seconds for the processes to join (default 60)")
    la.add_argument("rest", nargs=argparse.REMAINDER, help="-- then the command, e.g. -- forward --checkpoint tiny-llama ...")

    c = sub.add_parser("convert", help="write any supported checkpoint as a plain safetensors directory")
    c.add_argument("src", help="'smollm2', a HF directory or a .gguf file")
    c.add_argument("dst", help="the directory to create (written atomically)")
    c.add_argument("--max-shard-size", type=float, default=2048.0, metavar="MB",
                   help="split the tensors into files of at most this many MB (default %(default)s)")  # fmt: skip
    return parser


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(f"--input-ids expects comma-separated integers like 1,2,3, got {text!r}") from None
    if not ids:
        raise UsageError("--input-ids is empty; give at least one token id")
    return ids


def _setup(args):
    """Devices, checkpoint, mesh, lifted model — in that order (devices before jax starts)."""
    devs = device_setup.setup(args.devices)
    import sharding
    from bridge import checkpoints
    from bridge.lift import lift

    scheme = sharding.get_scheme(args.scheme)  # fail on a bad scheme before loading anything
    mesh = sharding.mesh_for(scheme, len(devs), sharding.parse_mesh(args.mesh), devs)
    import warnings

    from bridge import distributed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback summary is printed below, once
        kind, path = checkpoints.resolve(args.checkpoint)
        if distributed.configured() and kind == "dir" and args.quantize == "none":
            # Several processes: each reads only its own devices' slices from the memory-mapped files.
            from transformers import AutoTokenizer

            from bridge.lift import lift_checkpoint

            lifted = lift_checkpoint(path, mesh, scheme, dtype=args.dtype, fallback=args.fallback)
            loaded = checkpoints.Loaded(lifted.model, AutoTokenizer.from_pretrained(path), str(path),
                                        lifted.model.config.model_type)  # fmt: skip
        else:
            loaded = checkpoints.load(args.checkpoint, args.dtype, quantize=args.quantize)
            lifted = lift(loaded.model, mesh, scheme, fallback=args.fallback)
    for line in sharding.fallback_summary(lifted.placements):
        print(f"note: {line}", file=sys.stderr)
    return loaded, lifted


def cmd_forward(args) -> int:
    loaded, lifted = _setup(args)
    import numpy as np

    from bridge.generate import Generator

    if args.input_ids is not None:
        ids = _parse_ids(args.input_ids)
        vocab = lifted.model.config.vocab_size
        if max(ids) >= vocab or min(ids) < 0:
            raise UsageError(f"--input-ids must lie in [0, {vocab}) for this model")
    else:
        ids = Generator(lifted, loaded.tokenizer).encode(args.prompt, chat=args.chat)
    import sharding
    from bridge.distributed import is_main

    logits, first, warm = lifted.timed_forward([ids])
    logits = sharding.to_host(logits)
    held = sum(s.data.nbytes for a in lifted.weights.values() for s in a.addressable_shards)
    if not is_main():
        return 0
    print(f"parameter bytes held by this process: {held:,}")
    last = logits[0, -1]
    top = np.argsort(-last)[:5]
    print(f"mesh {dict(lifted.mesh.shape)} scheme {lifted.scheme.name}: logits shape {list(logits.shape)}")
    print("top-5 next tokens:")
    for t in top:
        piece = loaded.tokenizer.decode([int(t)]) if loaded.tokenizer is not None else ""
        print(f"  {int(t):>7} {piece!r:<16} logit {last[t]:.4f}")
    print(f"first call (compile + run): {first:.3f} s; warm call: {warm * 1000:.2f} ms")
    if args.save_logits:
        from bridge.files import atomic_write

        with atomic_write(args.save_logits, "wb") as fh:
            np.save(fh, logits)
        print(f"logits written to {args.save_logits}")
    return 0


def cmd_generate(args) -> int:
    if args.batch_file:
        try:
            with open(args.batch_file) as fh:
                prompts = [line.rstrip("\n") for line in fh if line.strip()]
        except OSError as e:
            raise UsageError(f"cannot read --batch-file: {e}") from None
        if not prompts:
            raise UsageError(f"--batch-file {args.batch_file} holds no prompts")
    else:
        prompts = [args.prompt]
    from bridge.generate import GenerationError, Generator, Sampling

    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p)
    except GenerationError as e:
        raise UsageError(str(e)) from None
    loaded, lifted = _setup(args)
    from bridge.distributed import is_main

    gen = Generator(lifted, loaded.tokenizer)
    stream = None
    if not is_main():
        gen.generate(prompts, args.max_new_tokens, sampling, args.seed, args.chat, None, args.truncate)
        return 0
    if not args.json and len(prompts) == 1:
        stream = lambda row, piece: print(piece, end="", flush=True)  # noqa: E731
    results = gen.generate(prompts, args.max_new_tokens, sampling, args.seed, args.chat, stream, args.truncate)
    for r in results:
        if args.json:
            print(json.dumps(r.to_json()))
        elif stream is not None:
            print()
        else:
            print(f"### {r.prompt}\n{r.text}\n")
    if not args.json:
        r = results[0]
        print(
            f"[mesh {dict(lifted.mesh.shape)} scheme {lifted.scheme.name}: compile {r.compile_seconds:.2f} s, "
            f"prefill {r.prefill_seconds * 1000:.1f} ms, decode {r.decode_tokens_per_second:.1f} tokens/s]",
            file=sys.stderr,
        )
    return 0


def cmd_shardings(args) -> int:
    if args.list:
        import sharding

        for s in sharding.SCHEMES.values():
            print(f"{s.name:<11} mesh {','.join(n for n, _ in s.mesh):<14} {s.description}")
        return 0
    loaded, lifted = _setup(args)
    import numpy as np

    import sharding

    rep = lifted.report()
    ids = np.zeros((args.batch, args.seq), dtype=np.int32)
    stats = sharding.compiled_stats(lifted.compiled_forward(ids))
    if args.json:
        print(json.dumps({"report": rep, **stats}))
        return 0
    print(sharding.format_report(rep, args.rows))
    print(f"collectives in one forward (batch {args.batch}, seq {args.seq}): "
          f"{sharding.format_collectives(stats['collectives'])}")  # fmt: skip
    m = stats["memory"]
    if m:
        print(f"per device: arguments {m['argument_size_in_bytes']:,} B, temporaries {m['temp_size_in_bytes']:,} B, "
              f"outputs {m['output_size_in_bytes']:,} B, peak {m['peak_bytes']:,} B")  # fmt: skip
    return 0


def cmd_compare(args) -> int:
    devs = device_setup.setup(args.devices)
    import sharding
    from bridge import checkpoints, experiments

    schemes = [s for s in args.schemes.split(",") if s]
    for name in schemes:
        sharding.get_scheme(name)  # unknown names fail before any work
    loaded = checkpoints.load(args.checkpoint, args.dtype, with_tokenizer=False, quantize=args.quantize)
    rows = experiments.compare(loaded.model, schemes, devs, args.mode, args.batch, args.seq, args.repeats, args.fallback)
    title = f"{args.checkpoint}: {args.mode}, batch {args.batch}, seq {args.seq}, {len(devs)} devices"
    paths = experiments.write_outputs(rows, args.out, title)
    print(experiments.format_markdown(rows, title))
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_profile(args) -> int:
    loaded, lifted = _setup(args)
    from bridge import profiling

    summary = profiling.profile(lifted, args.mode, args.steps, args.logdir, args.batch, args.seq)
    print(profiling.format_summary(summary))
    return 0


def cmd_plan(args) -> int:
    devs = device_setup.setup(args.devices)
    import sharding
    from bridge import plan as planner

    memory = None
    if args.device_memory:
        try:
            memory = planner.parse_bytes(args.device_memory)
        except ValueError as e:
            raise UsageError(str(e)) from None
    scheme = sharding.get_scheme(args.scheme)
    mesh = sharding.mesh_for(scheme, len(devs), sharding.parse_mesh(args.mesh), devs)
    if args.preset:
        import model_torch

        if args.preset not in model_torch.PRESETS:
            raise UsageError(f"unknown preset {args.preset!r}; presets: {', '.join(sorted(model_torch.PRESETS))}")
        what = args.preset
    else:
        from bridge import checkpoints

        kind, path = checkpoints.resolve(args.checkpoint)
        if kind != "dir":
            raise UsageError("plan --checkpoint needs a HF checkpoint directory (or use --preset)")
        import model_torch
        from transformers import AutoConfig

        what = model_torch.config_from_hf(AutoConfig.from_pretrained(path))
        if what is None:
            raise UsageError(f"{path}: no model_torch model for this model_type")
    result = planner.plan(what, mesh, scheme, dtype=args.dtype, mode=args.mode, batch=args.batch, seq=args.seq,
                          fallback=args.fallback, device_memory=memory)  # fmt: skip
    print(json.dumps(result, indent=2, default=str) if args.json else planner.format_plan(result))
    return 0


def cmd_launch(args) -> int:
    from bridge import distributed

    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if "--devices" in rest:
        raise UsageError("launch sets --devices per process itself; use --devices-per-process")
    try:
        return distributed.launch(rest, args.processes, args.devices_per_process, args.timeout)
    except distributed.LaunchError as e:
        raise UsageError(str(e)) from None


def cmd_convert(args) -> int:
    from bridge import checkpoints

    t0 = time.perf_counter()
    dst = checkpoints.convert(args.src, args.dst, int(args.max_shard_size * 2**20))
    print(f"wrote {dst} in {time.perf_counter() - t0:.1f} s")
    return 0


COMMANDS = {
    "forward": cmd_forward,
    "generate": cmd_generate,
    "shardings": cmd_shardings,
    "compare": cmd_compare,
    "profile": cmd_profile,
    "plan": cmd_plan,
    "launch": cmd_launch,
    "convert": cmd_convert,
}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from bridge.errors import USER_ERRORS

    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as e:
        print(f"torchax-bridge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("torchax-bridge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
