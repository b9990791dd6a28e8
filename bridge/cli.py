"""``torchax-bridge`` command line. Parses arguments before jax is imported, so ``--devices N`` can
still set the number of simulated CPU devices."""

from __future__ import annotations

import argparse
import json
import sys
import time

from bridge import devices as device_setup
from bridge.errors import BridgeError, UsageError




class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (exit 2), like every other input error."""

    def error(self, message: str):
        print(f"torchax-bridge: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _number(kind, low=None, *, above=None, high=None, what=""):
    """An argparse type: ``kind`` parsed, then checked against its range (one-line message)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects {what or kind.__name__}, got {text!r}") from None
        if value != value or (low is not None and value < low) or (above is not None and value <= above) \
                or (high is not None and value > high):  # fmt: skip
            raise argparse.ArgumentTypeError(f"expects {what}, got {text}")
        return value

    parse.__name__ = what or kind.__name__
    return parse


POSITIVE = _number(int, 1, what="a positive integer")
NON_NEGATIVE = _number(int, 0, what="an integer >= 0")
TEMPERATURE = _number(float, 0.0, what="a number >= 0 (0 is greedy)")
TOP_P = _number(float, above=0.0, high=1.0, what="a number in (0, 1]")
POSITIVE_FLOAT = _number(float, above=0.0, what="a positive number")


def _devices(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", type=POSITIVE, default=None,
                   help="devices in the mesh (default: every device jax sees, 1 on a CPU host); on CPU, that "
                        "many simulated devices")  # fmt: skip


def _common(p: argparse.ArgumentParser, scheme_default: str = "tp") -> None:
    p.add_argument("--checkpoint", default="smollm2",
                   help="'smollm2' (default, embedded), a HF checkpoint directory, a .gguf file, or a preset")
    _devices(p)
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
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=None,
                   help="run the decoder stack as one jax.lax.scan over weights stacked per layer: compiles one "
                        "layer instead of all (default: scanned whenever the model can be, i.e. any stack of "
                        "identical layers, except every model on a GPU and 16-bit models on CPU without the CPU "
                        "kernels, where the slices cost more than they save; --no-scan-layers unrolls every layer)")  # fmt: skip
    p.add_argument("--no-cache", action="store_true",
                   help="trace and compile from scratch: skip the caches of traced programs and XLA executables "
                        "under $TORCHAX_BRIDGE_CACHE (same as TORCHAX_BRIDGE_NO_CACHE=1)")  # fmt: skip
    p.add_argument("--implementation", choices=["auto", "model_torch", "transformers"], default="auto",
                   help="the model definition: our model_torch rewrite, transformers' own class (any causal LM), "
                        "or auto (ours where we have one; default)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="torchax-bridge",
        description="Run PyTorch model definitions on JAX: lift with torchax, shard by rule table, jit. "
                    "Exit codes: 0 ok, 1 failure, 2 usage or input error, 130 interrupted.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    f = sub.add_parser("forward", help="one jitted forward pass: shape, top-5 next tokens, timings")
    _common(f)
    src = f.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text to tokenize")
    src.add_argument("--input-ids", help="comma-separated token ids, e.g. 1,2,3 (no tokenizer is loaded)")
    f.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to --prompt")
    f.add_argument("--save-logits", metavar="FILE.npy", help="write the logits [batch, seq, vocab] here (a new file)")

    g = sub.add_parser("generate", help="generate text (jitted prefill + on-device decode loop)")
    _common(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt")
    src.add_argument("--batch-file", help="a file with one prompt per line, generated as one batch")
    src.add_argument("--input-ids", help="comma-separated token ids (one prompt), or a file with one comma-"
                                         "separated row per line (a batch); no tokenizer is loaded")  # fmt: skip
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    g.add_argument("--max-new-tokens", type=POSITIVE, default=64)
    g.add_argument("--temperature", type=TEMPERATURE, default=0.0, help="0 (default) is greedy")
    g.add_argument("--top-k", type=NON_NEGATIVE, default=0, help="keep the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=TOP_P, default=1.0, help="nucleus sampling mass in (0, 1] (1: off)")
    g.add_argument("--seed", type=NON_NEGATIVE, default=0)
    g.add_argument("--truncate", action="store_true", help="left-truncate a prompt too long for the context")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt (with its token ids) instead of text")

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching (/v1/completions, "
                                      "/v1/chat/completions, /v1/models, /health)")  # fmt: skip
    _common(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    sv.add_argument("--port", type=_number(int, 0, high=65535, what="a port in [0, 65535]"), default=8000,
                    help="0 picks a free port")  # fmt: skip
    sv.add_argument("--max-batch", type=POSITIVE, default=8, help="slots decoded together in one step")
    sv.add_argument("--max-seq", type=POSITIVE, default=2048, help="prompt + new tokens of one request, at most")
    sv.add_argument("--queue", type=POSITIVE, default=64, help="requests that may wait for a slot; more get HTTP 429")
    sv.add_argument("--model-name", help="the model id clients name (default: the --checkpoint value)")
    sv.add_argument("--no-warmup", action="store_true", help="compile each prompt bucket on first use, not at start")

    s = sub.add_parser("shardings", help="where each weight goes under a scheme, and what one forward costs")
    _common(s)
    s.add_argument("--list", action="store_true", help="list the built-in schemes and exit")
    s.add_argument("--seq", type=POSITIVE, default=32, help="sequence length of the analysed forward")
    s.add_argument("--batch", type=POSITIVE, default=1)
    s.add_argument("--rows", type=POSITIVE, default=None, help="show at most this many parameter rows")
    s.add_argument("--json", action="store_true")
    cmp = sub.add_parser("compare", help="sharding schemes side by side: time, memory, collectives, accuracy")
    _common(cmp)
    cmp.add_argument("--schemes", default=None,
                     help="comma-separated scheme names (default: those of replicated,tp,fsdp,dp,dp_tp that fit "
                          "the model on this mesh; a scheme named here that does not fit is a row saying why)")  # fmt: skip
    cmp.add_argument("--batch", type=POSITIVE, default=8)
    cmp.add_argument("--seq", type=POSITIVE, default=64, help="tokens per row (forward) or KV cache length (decode)")
    cmp.add_argument("--mode", choices=["forward", "decode", "train"], default="forward",
                     help="what one step is: a forward, a decode step, or an AdamW training step (then the rows "
                          "show gradient and optimizer bytes per device too)")  # fmt: skip
    cmp.add_argument("--repeats", type=POSITIVE, default=5, help="timed runs per scheme (median, min, max)")
    cmp.add_argument("--out", default="compare-out", help="directory for compare.csv, compare.md, compare.png")

    prof = sub.add_parser("profile", help="trace K warm steps into a TensorBoard / xprof log directory")
    _common(prof)
    prof.add_argument("--steps", type=POSITIVE, default=3)
    prof.add_argument("--logdir", default="/tmp/torchax-bridge-trace",
                      help="TensorBoard log directory (each run adds its own subdirectory)")
    prof.add_argument("--mode", choices=["forward", "decode"], default="forward")
    prof.add_argument("--batch", type=POSITIVE, default=1)
    prof.add_argument("--seq", type=POSITIVE, default=32)

    pl = sub.add_parser("plan", help="per-device memory and collectives of a model on a mesh, no weights allocated")
    what = pl.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", help="a model_torch preset, e.g. grok-1, llama-3-8b, neox-20b")
    what.add_argument("--checkpoint", help="a HF checkpoint directory (only its config.json is read)")
    _devices(pl)
    pl.add_argument("--mesh", default=None)
    pl.add_argument("--scheme", default="tp")
    pl.add_argument("--fallback", choices=["error", "replicate"], default="error")
    pl.add_argument("--dtype", choices=["bfloat16", "int8", "float32"], default="bfloat16")
    pl.add_argument("--mode", choices=["forward", "decode"], default="decode")
    pl.add_argument("--batch", type=POSITIVE, default=1)
    pl.add_argument("--seq", type=POSITIVE, default=2048, help="tokens (forward) or KV-cache length (decode)")
    pl.add_argument("--device-memory", default=None, help="e.g. 80GiB: say whether the plan fits")
    pl.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=None,
                    help="plan the scanned decoder stack: one full compile, exact temporaries and collectives; "
                         "--no-scan-layers: 1- and 2-layer compiles, extrapolated (default: the layout generate "
                         "runs on this backend; every model unrolls on a GPU, 16-bit models on CPU without the kernels)")  # fmt: skip
    pl.add_argument("--json", action="store_true")

    la = sub.add_parser("launch", help="run a command in several local processes joined by jax.distributed")
    la.add_argument("--processes", type=POSITIVE, default=2)
    la.add_argument("--devices-per-process", type=POSITIVE, default=4)
    la.add_argument("--timeout", type=POSITIVE_FLOAT, default=60.0, help="seconds for the processes to join (default 60)")
    la.add_argument("rest", nargs=argparse.REMAINDER, help="-- then the command, e.g. -- forward --checkpoint tiny-llama ...")

    ck = sub.add_parser("check", help="eager torch vs lifted (1 device, and the scheme): per-module error, first "
                                      "divergence, ops torchax cannot lower; exit 1 on any divergence")  # fmt: skip
    _common(ck)
    ck.add_argument("--input-ids", help="comma-separated token ids (default: 16 fixed pseudo-random ids)")
    ck.add_argument("--tolerance", type=POSITIVE_FLOAT, default=None,
                    help="max relative error per module (default: 1e-4 for float32, 3e-2 for bfloat16)")
    ck.add_argument("--rows", type=POSITIVE, default=None, help="show at most this many module rows")
    ck.add_argument("--json", action="store_true")

    ex = sub.add_parser("export", help="serialize the jitted forward, prefill and decode step (jax.export, "
                                       "StableHLO) with the weights: runs with JAX alone")  # fmt: skip
    _common(ex)
    ex.add_argument("--out", required=True, help="the directory to create (written atomically; must not exist)")
    ex.add_argument("--batch", type=POSITIVE, default=1)
    ex.add_argument("--prompt-len", type=POSITIVE, default=64,
                    help="prompt tokens the exported prefill takes (shorter prompts are left-padded)")  # fmt: skip
    ex.add_argument("--max-new-tokens", type=POSITIVE, default=64, help="KV-cache room for new tokens")

    tr = sub.add_parser("train", help="fine-tune on a text file: AdamW steps under a sharding scheme, loss curve, "
                                      "a checkpoint generate loads; resumes from --out")  # fmt: skip
    _common(tr, scheme_default="fsdp")
    tr.add_argument("--data", required=True, help="a UTF-8 text file, tokenized and packed into --seq windows")
    tr.add_argument("--steps", type=POSITIVE, default=20, help="optimizer steps to run now (a resumed run continues "
                                                                "its step count)")  # fmt: skip
    tr.add_argument("--batch", type=POSITIVE, default=4)
    tr.add_argument("--seq", type=POSITIVE, default=128)
    tr.add_argument("--lr", type=POSITIVE_FLOAT, default=1e-4)
    tr.add_argument("--weight-decay", type=_number(float, 0.0, what="a number >= 0"), default=0.0)
    tr.add_argument("--remat", action="store_true", help="recompute each decoder layer in the backward pass")
    tr.add_argument("--out", default=None, help="checkpoint directory to write (and to resume from when it holds "
                                                "a training run)")  # fmt: skip
    tr.add_argument("--save-every", type=_number(int, 0, what="an integer >= 0"), default=0, metavar="N",
                    help="also save the resumable state to --out every N steps (atomically: a killed run "
                         "keeps the last save)")  # fmt: skip

    c = sub.add_parser("convert", help="write any supported checkpoint as a plain safetensors directory")
    c.add_argument("src", help="'smollm2', a HF directory or a .gguf file")
    c.add_argument("dst", help="the directory to create (written atomically; must not exist)")
    c.add_argument("--max-shard-size", type=POSITIVE_FLOAT, default=2048.0, metavar="MB",
                   help="split the tensors into files of at most this many MB (default %(default)s)")  # fmt: skip
    return parser


def _parse_ids(text: str, where: str = "--input-ids") -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(f"{where} expects comma-separated integers like 1,2,3, got {text.strip()[:60]!r}") from None
    if not ids:
        raise UsageError(f"{where} is empty; give at least one token id")
    return ids


def _id_rows(value: str) -> list[list[int]]:
    """``--input-ids``: one comma-separated row, or a file of such rows (one prompt per line)."""
    import os

    if os.path.isfile(value):
        try:
            with open(value) as fh:
                lines = [line for line in fh.read().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --input-ids file {value}: {e}") from None
        if not lines:
            raise UsageError(f"--input-ids file {value} holds no rows; write one comma-separated row per line")
        return [_parse_ids(line, f"--input-ids file {value}, line {i + 1},") for i, line in enumerate(lines)]
    if "/" in value or value.endswith(".txt"):
        raise UsageError(f"--input-ids file {value} does not exist; pass ids like 1,2,3 or an existing file")
    return [_parse_ids(value)]


def _setup(args, with_tokenizer: bool = True):
    """The lifted model the arguments describe (``bridge.models.open_model``), with the fallback
    summary printed once."""
    devs = device_setup.setup(args.devices)  # before jax starts: --devices sets the simulated count
    import sharding
    from bridge.models import open_model

    lifted = open_model(args.checkpoint, devices=devs, scheme=args.scheme, mesh=sharding.parse_mesh(args.mesh),
                        dtype=args.dtype, quantize=args.quantize, fallback=args.fallback,
                        with_tokenizer=with_tokenizer, implementation=args.implementation,
                        scan_layers=args.scan_layers)  # fmt: skip
    for line in sharding.fallback_summary(lifted.placements):
        print(f"note: {line}", file=sys.stderr)
    return lifted


def _no_chat_with_ids(args) -> None:
    if args.chat and args.input_ids is not None:
        raise UsageError("--chat applies the tokenizer's chat template to text; drop it with --input-ids")


def cmd_serve(args) -> int:
    lifted = _setup(args)
    from bridge import server
    from bridge.serving import Engine

    t0 = time.perf_counter()
    engine = Engine(lifted, slots=args.max_batch, max_seq=args.max_seq, queue_size=args.queue)
    if not args.no_warmup:
        engine.warm()
    print(f"compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    name = args.model_name or args.checkpoint
    try:
        server.serve(engine, name, args.host, args.port, log=lambda line: print(line, file=sys.stderr, flush=True))
    except KeyboardInterrupt:  # uvicorn raises the signal again after its graceful shutdown
        pass
    print("stopped: requests in flight finished", file=sys.stderr)
    return 0


def cmd_forward(args) -> int:
    _no_chat_with_ids(args)
    ids = _parse_ids(args.input_ids) if args.input_ids is not None else None
    if args.save_logits:
        from bridge.files import check_output

        check_output(args.save_logits, "--save-logits")
    lifted = _setup(args, with_tokenizer=ids is None)
    import numpy as np

    from bridge.generate import Generator, check_token_ids

    if ids is None:
        ids = Generator(lifted, lifted.tokenizer).encode(args.prompt, chat=args.chat)
    check_token_ids([ids], lifted.model.vocab_size)
    context = lifted.model.context_length
    if len(ids) > context:
        raise UsageError(f"the input is {len(ids)} tokens; this model's context is {context}: shorten it")
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
        piece = lifted.tokenizer.decode([int(t)]) if lifted.tokenizer is not None else ""
        print(f"  {int(t):>7} {piece!r:<16} logit {last[t]:.4f}")
    print(f"first call (compile + run): {first:.3f} s; warm call: {warm * 1000:.2f} ms")
    if args.save_logits:
        from bridge.files import atomic_write

        with atomic_write(args.save_logits, "wb") as fh:
            np.save(fh, logits)
        print(f"logits written to {args.save_logits}")
    return 0


def cmd_generate(args) -> int:
    _no_chat_with_ids(args)
    prompts, id_rows = None, None
    if args.batch_file:
        try:
            with open(args.batch_file) as fh:
                prompts = [line.rstrip("\n") for line in fh if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --batch-file: {e}") from None
        if not prompts:
            raise UsageError(f"--batch-file {args.batch_file} holds no prompts")
    elif args.input_ids is not None:
        id_rows = _id_rows(args.input_ids)
    else:
        prompts = [args.prompt]
    from bridge.generate import Generator, Sampling

    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    lifted = _setup(args, with_tokenizer=id_rows is None)
    from bridge.distributed import is_main

    gen = Generator(lifted, lifted.tokenizer)
    if id_rows is None:
        id_rows = [gen.encode(p, args.chat) for p in prompts]
    run = lambda stream: gen.generate_from_ids(  # noqa: E731
        id_rows, args.max_new_tokens, sampling, args.seed, stream, args.truncate, prompts
    )
    if not is_main():
        run(None)
        return 0
    stream = None
    if not args.json and len(id_rows) == 1:
        stream = lambda row, piece: print(piece, end="", flush=True)  # noqa: E731
    result = run(stream)
    if result.truncated_to is not None:
        print(f"note: prompt left-truncated to its last {result.truncated_to} tokens", file=sys.stderr)
    for row in result.rows():
        if args.json:
            print(json.dumps(row))
        elif stream is not None:
            print()
        else:
            print(f"### {row['prompt']}\n{row['text']}\n")
    if not args.json:
        print(
            f"[mesh {dict(lifted.mesh.shape)} scheme {lifted.scheme.name}: compile {result.compile_seconds:.2f} s "
            f"({result.compile_detail}), "
            f"prefill {result.prefill_seconds * 1000:.1f} ms, decode {result.decode_tokens_per_second:.1f} tokens/s]",
            file=sys.stderr,
        )
    return 0


def cmd_shardings(args) -> int:
    if args.list:
        import sharding

        for s in sharding.SCHEMES.values():
            print(f"{s.name:<11} mesh {','.join(n for n, _ in s.mesh):<14} {s.description}")
        return 0
    lifted = _setup(args, with_tokenizer=False)
    import numpy as np

    import sharding
    from bridge import hlo

    rep = lifted.report()
    ids = np.zeros((args.batch, args.seq), dtype=np.int32)
    stats = hlo.compiled_stats(lifted.compiled_forward(ids))
    if args.json:
        print(json.dumps({"report": rep, **stats}))
        return 0
    print(sharding.format_report(rep, args.rows))
    print(f"collectives in one forward (batch {args.batch}, seq {args.seq}): "
          f"{hlo.format_collectives(stats['collectives'])}")  # fmt: skip
    m = stats["memory"]
    if m:
        print(f"per device: arguments {m['argument_size_in_bytes']:,} B, temporaries {m['temp_size_in_bytes']:,} B, "
              f"outputs {m['output_size_in_bytes']:,} B, peak {m['peak_bytes']:,} B")  # fmt: skip
    return 0


def cmd_compare(args) -> int:
    from bridge import experiments
    from bridge.files import check_output

    out = check_output(args.out, "--out", kind="dir", may_exist=True)
    for name in experiments.OUTPUT_FILES:
        check_output(out / name, "--out")  # an earlier run's results are not overwritten
    if args.schemes is not None:
        schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
        if not schemes:
            raise UsageError("--schemes is empty; name at least one scheme, e.g. --schemes tp,fsdp")
    else:
        schemes = None
    devs = device_setup.setup(args.devices)
    import sharding
    from bridge.models import open_model

    overrides = sharding.parse_mesh(args.mesh)
    for name in schemes or ():
        sharding.get_scheme(name)  # unknown names fail before any work
    # Opened as every command opens a checkpoint: on one device, replicated, which is compare's
    # reference run; each scheme then lifts the same module onto the whole mesh.
    reference = open_model(args.checkpoint, devices=devs[:1], scheme="replicated", dtype=args.dtype,
                           quantize=args.quantize, with_tokenizer=False, implementation=args.implementation)  # fmt: skip
    if schemes is None:
        schemes, left_out = experiments.default_schemes(reference.model, devs, overrides, args.fallback)
        for name, why in left_out:
            print(f"note: default scheme {name} left out: {why}", file=sys.stderr)
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    rows = experiments.compare(reference, schemes, devs, args.mode, args.batch, args.seq, args.repeats,
                               args.fallback, mesh=overrides, progress=progress,
                               scan_layers=args.scan_layers)  # fmt: skip
    title = f"{args.checkpoint}: {args.mode}, batch {args.batch}, seq {args.seq}, {len(devs)} devices"
    paths = experiments.write_outputs(rows, out, title)
    print(experiments.format_markdown(rows, title))
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_profile(args) -> int:
    from bridge.files import check_output

    check_output(args.logdir, "--logdir", kind="dir", may_exist=True)
    lifted = _setup(args, with_tokenizer=False)
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
        if kind in checkpoints.STORED_LAYOUTS:  # the model as its files size it, on the meta device
            model, _, hf_config = checkpoints.open_stored(kind, path)
            what = (type(model), model.config, hf_config)
        elif kind != "dir":
            raise UsageError("plan --checkpoint needs a HF checkpoint directory, GPT-NeoX slim weights or Grok-1's "
                             "ckpt-0 (or use --preset)")  # fmt: skip
        else:
            import model_torch

            hf_config = checkpoints.load_config(path)
            what = model_torch.config_from_hf(hf_config) or hf_config  # else transformers' own class
    result = planner.plan(what, mesh, scheme, dtype=args.dtype, mode=args.mode, batch=args.batch, seq=args.seq,
                          fallback=args.fallback, device_memory=memory, scan_layers=args.scan_layers)  # fmt: skip
    print(json.dumps(result, indent=2, default=str) if args.json else planner.format_plan(result))
    return 0


def cmd_launch(args) -> int:
    from bridge import distributed

    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if "--devices" in rest:
        raise UsageError("launch sets --devices per process itself; use --devices-per-process")
    if not rest:
        raise UsageError("nothing to launch: give a command after --, e.g. -- forward --checkpoint tiny-llama ...")
    # The children's command line is checked here, once: a command that cannot start is a usage error.
    child = build_parser().parse_args([*rest, "--devices", str(args.devices_per_process)])
    if child.command in ("launch", "convert"):
        raise UsageError(f"launch runs model commands (forward, generate, ...), not {child.command}")
    return distributed.launch(rest, args.processes, args.devices_per_process, args.timeout)


def cmd_check(args) -> int:
    ids = _parse_ids(args.input_ids) if args.input_ids is not None else None
    devs = device_setup.setup(args.devices)
    import sharding
    from bridge import check

    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    report = check.check_checkpoint(args.checkpoint, devs, args.scheme, mesh_overrides=sharding.parse_mesh(args.mesh),
                                    input_ids=ids, dtype=args.dtype, quantize=args.quantize, fallback=args.fallback,
                                    implementation=args.implementation, tolerance=args.tolerance,
                                    scan_layers=args.scan_layers, progress=progress)  # fmt: skip
    print(json.dumps(report.to_json()) if args.json else check.format_check(report, args.rows))
    return 0 if report.ok else 1


def cmd_export(args) -> int:
    from bridge import export
    from bridge.files import check_output

    check_output(args.out, "--out", kind="dir")
    lifted = _setup(args, with_tokenizer=True)
    t0 = time.perf_counter()
    out = export.export_causal_lm(lifted, args.out, batch=args.batch, prompt_len=args.prompt_len,
                                  max_new_tokens=args.max_new_tokens)  # fmt: skip
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s; run it with JAX alone: "
          f"python -m bridge.exported {out} --input-ids 1,2,3")  # fmt: skip
    return 0


def cmd_train(args) -> int:
    if args.quantize != "none":
        raise UsageError("an int8-quantized model cannot be trained; drop --quantize")
    devs = device_setup.setup(args.devices)
    import sharding
    from bridge import train

    result = train.run(args.checkpoint, args.data, devices=devs, scheme=args.scheme,
                       mesh_overrides=sharding.parse_mesh(args.mesh), steps=args.steps, batch=args.batch,
                       seq=args.seq, lr=args.lr, weight_decay=args.weight_decay, remat=args.remat, out=args.out,
                       dtype=args.dtype, fallback=args.fallback, implementation=args.implementation,
                       log=lambda line: print(line, file=sys.stderr), scan_layers=args.scan_layers,
                       save_every=args.save_every)  # fmt: skip
    losses = result["losses"]
    run = losses[len(losses) - args.steps:]
    print(f"steps {run[0]['step']}..{run[-1]['step']}: loss {run[0]['loss']:.4f} -> {run[-1]['loss']:.4f}")
    b = result["bytes_per_device"]
    print(f"per device: parameters {b['params']:,} B, gradients {b['grads']:,} B, optimizer {b['optimizer']:,} B")
    if result["out"] is not None:
        print(f"written to {result['out']} (loss.csv, loss.png; generate --checkpoint {result['out']})")
    return 0


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
    "serve": cmd_serve,
    "launch": cmd_launch,
    "convert": cmd_convert,
    "check": cmd_check,
    "export": cmd_export,
    "train": cmd_train,
}


def main(argv=None) -> int:
    """Exit codes: 0 ok, 1 failure (a bug or a failed child process), 2 usage or input error (one
    line on stderr naming the problem and the fix), 130 interrupted (Ctrl-C; nothing half-written)."""
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "no_cache", False):  # read by bridge.compile_cache (which imports jax: not yet)
            import os

            os.environ["TORCHAX_BRIDGE_NO_CACHE"] = "1"
        return COMMANDS[args.command](args)
    except BridgeError as e:
        print(f"torchax-bridge: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("torchax-bridge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
