"""Every command against a table of bad inputs: exit code 2, exactly one line on stderr that names
the problem, no traceback, and nothing left at the output path.

The rows run in-process through ``bridge.cli.main`` (the same code path as the console script, which
only adds ``sys.exit``), so the table of 70+ rows costs seconds, not a Python start-up each. The
checkpoints are made the way users make them: ``save_pretrained`` without tokenizer files, and
broken copies of those files (empty, truncated, garbage)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bridge import cli

# ---------------------------------------------------------------------------------------------------
# Fixtures: one directory of good and broken inputs, made once.
# ---------------------------------------------------------------------------------------------------
VOCAB = 320
CONTEXT = 128


def _save_tiny_llama(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)  # config.json + model.safetensors, no tokenizer


def _tiny_gguf(path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((64, 16), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, devices) -> dict[str, Path]:  # devices: 8 started before any --devices
    root = tmp_path_factory.mktemp("bad-inputs")
    good = root / "good"
    _save_tiny_llama(good)
    weights = (good / "model.safetensors").read_bytes()
    config = (good / "config.json").read_text()
    paths = {"root": root, "good": good}

    def directory(name: str, files: dict[str, bytes | str]) -> Path:
        d = root / name
        d.mkdir()
        for fname, content in files.items():
            (d / fname).write_bytes(content if isinstance(content, bytes) else content.encode())
        paths[name] = d
        return d

    directory("broken_config", {"config.json": "{ not json", "model.safetensors": weights})
    directory("unknown_type", {"config.json": json.dumps({"model_type": "no-such-architecture"}), "model.safetensors": weights})
    directory("no_weights", {"config.json": config})
    directory("empty_safetensors", {"config.json": config, "model.safetensors": b""})
    directory("garbage_safetensors", {"config.json": config, "model.safetensors": b"\x13\x00garbage" * 100})
    directory("truncated_safetensors", {"config.json": config, "model.safetensors": weights[: len(weights) // 2]})
    from safetensors.torch import load_file

    torch.save(load_file(good / "model.safetensors"), root / "weights.bin")
    bin_data = (root / "weights.bin").read_bytes()
    directory("empty_bin", {"config.json": config, "pytorch_model.bin": b""})
    directory("garbage_bin", {"config.json": config, "pytorch_model.bin": b"PK\x03\x04 garbage" * 50})
    directory("truncated_bin", {"config.json": config, "pytorch_model.bin": bin_data[: len(bin_data) // 2]})
    lone = root / "lone"
    lone.mkdir()
    (lone / "model.safetensors").write_bytes(weights)
    paths["lone_safetensors"] = lone / "model.safetensors"
    _tiny_gguf(root / "tiny.gguf")
    gg = (root / "tiny.gguf").read_bytes()
    for name, data in {"empty.gguf": b"", "garbage.gguf": b"GARBAGE!" * 64, "truncated.gguf": gg[: len(gg) - 100]}.items():
        (root / name).write_bytes(data)
        paths[name] = root / name
    (root / "notes.txt").write_text("not a checkpoint")
    paths["notes.txt"] = root / "notes.txt"
    # Scheme files
    schemes = {
        "bad.json": "[[\".*\", [\"model\",]",
        "bad.yaml": "- [unclosed, [model\n  - : :",
        "badregex.json": json.dumps([["(unclosed", ["model"]], [".*", []]]),
        "noaxis.json": json.dumps({"rules": [[".*proj.weight", ["data"]], [".*", []]], "mesh": {"model": -1}}),
        "toolong.json": json.dumps([["embed_tokens.weight", [None, None, None]], [".*", []]]),
        "twice.json": json.dumps([["proj.weight", ["model", "model"]], [".*", []]]),
        "number.json": "42",
        "badrows.yaml": "rules: 7\n",
    }
    for name, text in schemes.items():
        (root / name).write_text(text)
        paths[name] = root / name
    (root / "raises.py").write_text("raise RuntimeError('boom')\n")
    paths["raises.py"] = root / "raises.py"
    # Existing outputs and a file to put paths under (unwritable even for root)
    (root / "exists.npy").write_bytes(b"x")
    paths["exists.npy"] = root / "exists.npy"
    prior = root / "prior_compare"
    prior.mkdir()
    (prior / "compare.csv").write_text("scheme\n")
    paths["prior_compare"] = prior
    paths["a_file"] = root / "notes.txt"
    (root / "long_ids.txt").write_text(",".join(["5"] * (CONTEXT + 20)) + "\n")
    paths["long_ids.txt"] = root / "long_ids.txt"
    return paths


# ---------------------------------------------------------------------------------------------------
# The table: (id, argv with {placeholders}, words the one line must contain, output path that must
# not be left behind or changed)
# ---------------------------------------------------------------------------------------------------
IDS = ["--input-ids", "1,2,3", "--devices", "1"]
TINY = ["--checkpoint", "{good}", "--devices", "1"]
FWD = ["forward", *TINY, *IDS]
GEN = ["generate", *TINY, "--input-ids", "1,2,3", "--max-new-tokens", "4"]

ROWS = [
    # checkpoints: missing, empty, truncated, garbage, for every kind
    ("ckpt-missing", ["forward", "--checkpoint", "{root}/nope", *IDS], ["not found", "preset"], None),
    ("gguf-empty", ["forward", "--checkpoint", "{empty.gguf}", *IDS], ["empty.gguf", "GGUF"], None),
    ("gguf-garbage", ["forward", "--checkpoint", "{garbage.gguf}", *IDS], ["garbage.gguf", "GGUF"], None),
    ("gguf-truncated", ["forward", "--checkpoint", "{truncated.gguf}", *IDS], ["truncated.gguf", "truncated"], None),
    ("config-broken", ["forward", "--checkpoint", "{broken_config}", *IDS], ["config.json", "save_pretrained"], None),
    ("config-unknown-type", ["forward", "--checkpoint", "{unknown_type}", *IDS], ["config.json", "no-such-architecture"], None),
    ("no-weights", ["forward", "--checkpoint", "{no_weights}", *IDS], ["no_weights", "safetensors"], None),
    ("safetensors-empty", ["forward", "--checkpoint", "{empty_safetensors}", *IDS], ["model.safetensors", "corrupt"], None),
    ("safetensors-garbage", ["forward", "--checkpoint", "{garbage_safetensors}", *IDS], ["model.safetensors", "corrupt"], None),
    ("safetensors-truncated", ["forward", "--checkpoint", "{truncated_safetensors}", *IDS], ["model.safetensors", "truncated"], None),
    ("bin-empty", ["forward", "--checkpoint", "{empty_bin}", *IDS], ["pytorch_model.bin", "corrupt"], None),
    ("bin-garbage", ["forward", "--checkpoint", "{garbage_bin}", *IDS], ["pytorch_model.bin", "corrupt"], None),
    ("bin-truncated", ["forward", "--checkpoint", "{truncated_bin}", *IDS], ["pytorch_model.bin", "corrupt"], None),
    ("lone-safetensors", ["forward", "--checkpoint", "{lone_safetensors}", *IDS], ["config.json", "directory"], None),
    ("not-a-checkpoint", ["forward", "--checkpoint", "{notes.txt}", *IDS], ["notes.txt", "not a checkpoint"], None),
    ("generate-broken-gguf", ["generate", "--checkpoint", "{garbage.gguf}", *IDS], ["garbage.gguf"], None),
    ("shardings-missing", ["shardings", "--checkpoint", "{root}/nope"], ["not found"], None),
    ("profile-broken-config", ["profile", "--checkpoint", "{broken_config}", "--logdir", "{root}/trace-a"], ["config.json"], "{root}/trace-a"),
    ("compare-no-weights", ["compare", "--checkpoint", "{no_weights}", "--out", "{root}/cmp-a"], ["no_weights"], "{root}/cmp-a"),
    ("plan-broken-config", ["plan", "--checkpoint", "{broken_config}"], ["config.json"], None),
    ("convert-truncated", ["convert", "{truncated_safetensors}", "{root}/conv-a"], ["truncated"], "{root}/conv-a"),
    # names
    ("preset-unknown", ["plan", "--preset", "no-such-preset"], ["no-such-preset", "presets"], None),
    ("scheme-unknown", [*FWD, "--scheme", "nope"], ["nope", "tp"], None),
    ("dtype-unknown", [*FWD, "--dtype", "float8"], ["--dtype", "float8"], None),
    ("quantize-unknown", [*FWD, "--quantize", "int4"], ["--quantize", "int4"], None),
    ("command-unknown", ["frobnicate"], ["frobnicate"], None),
    # devices and meshes
    ("devices-0", [*FWD, "--devices", "0"], ["--devices", "positive"], None),
    ("devices-negative", [*FWD, "--devices", "-1"], ["--devices", "positive"], None),
    ("devices-too-many", [*FWD, "--devices", "9"], ["--devices 9", "8"], None),
    ("mesh-foreign-axis", [*FWD, "--devices", "2", "--mesh", "data=2"], ["data", "--mesh"], None),
    ("mesh-wrong-product", [*FWD, "--devices", "4", "--scheme", "dp_tp", "--mesh", "data=2,model=4"], ["8", "4"], None),
    ("mesh-garbage", [*FWD, "--mesh", "model"], ["--mesh", "name=size"], None),
    ("mesh-zero", [*FWD, "--mesh", "model=0"], ["model=0", "positive"], None),
    # scheme files
    ("scheme-bad-json", [*FWD, "--scheme", "{bad.json}"], ["bad.json", "JSON"], None),
    ("scheme-bad-yaml", [*FWD, "--scheme", "{bad.yaml}"], ["bad.yaml", "YAML"], None),
    ("scheme-bad-regex", [*FWD, "--scheme", "{badregex.json}"], ["(unclosed", "compile"], None),
    ("scheme-missing-axis", [*FWD, "--devices", "2", "--scheme", "{noaxis.json}"], ["'data'", "axes"], None),
    ("scheme-spec-too-long", [*FWD, "--scheme", "{toolong.json}"], ["embed_tokens.weight", "rank"], None),
    ("scheme-axis-twice", [*FWD, "--scheme", "{twice.json}"], ["'model'", "twice"], None),
    ("scheme-wrong-type", [*FWD, "--scheme", "{number.json}"], ["number.json", "rows"], None),
    ("scheme-rules-not-list", [*FWD, "--scheme", "{badrows.yaml}"], ["badrows.yaml", "rows"], None),
    ("scheme-py-raises", [*FWD, "--scheme", "{raises.py}:RULES"], ["raises.py", "boom"], None),
    ("scheme-py-missing", [*FWD, "--scheme", "{root}/nope.py:RULES"], ["nope.py", "does not exist"], None),
    # counts
    ("max-new-tokens-0", [*GEN[:-1], "0"], ["--max-new-tokens", "positive"], None),
    ("max-new-tokens-negative", [*GEN[:-1], "-3"], ["--max-new-tokens"], None),
    ("steps-0", ["profile", *TINY, "--steps", "0", "--logdir", "{root}/trace-b"], ["--steps", "positive"], "{root}/trace-b"),
    ("compare-batch-0", ["compare", *TINY, "--batch", "0", "--out", "{root}/cmp-b"], ["--batch", "positive"], "{root}/cmp-b"),
    ("compare-repeats-0", ["compare", *TINY, "--repeats", "0", "--out", "{root}/cmp-c"], ["--repeats"], "{root}/cmp-c"),
    ("plan-batch-0", ["plan", "--preset", "tiny-llama", "--batch", "0"], ["--batch", "positive"], None),
    ("shardings-seq-0", ["shardings", *TINY, "--seq", "0"], ["--seq"], None),
    ("launch-processes-0", ["launch", "--processes", "0", "--", *FWD], ["--processes"], None),
    ("seed-negative", [*GEN, "--seed", "-1"], ["--seed", ">= 0"], None),
    ("convert-shard-0", ["convert", "{good}", "{root}/conv-b", "--max-shard-size", "0"], ["--max-shard-size"], "{root}/conv-b"),
    ("convert-shard-negative", ["convert", "{good}", "{root}/conv-c", "--max-shard-size", "-1"], ["--max-shard-size"], "{root}/conv-c"),
    # sampling
    ("temperature-negative", [*GEN, "--temperature", "-0.5"], ["--temperature", ">= 0"], None),
    ("top-p-0", [*GEN, "--top-p", "0"], ["--top-p", "(0, 1]"], None),
    ("top-p-above-1", [*GEN, "--top-p", "1.5"], ["--top-p", "(0, 1]"], None),
    ("top-k-negative", [*GEN, "--top-k", "-1"], ["--top-k", ">= 0"], None),
    # ids and prompts
    ("ids-not-integers", ["forward", *TINY, "--input-ids", "a,b"], ["--input-ids", "integers"], None),
    ("ids-empty", ["forward", *TINY, "--input-ids", ","], ["--input-ids", "empty"], None),
    ("ids-outside-vocab", ["forward", *TINY, "--input-ids", f"1,{VOCAB}"], [str(VOCAB), "vocabulary"], None),
    ("ids-negative", ["forward", *TINY, "--input-ids=-1,2"], ["-1", "vocabulary"], None),
    ("generate-ids-outside-vocab", ["generate", *TINY, "--input-ids", f"{VOCAB + 5}"], [str(VOCAB + 5), "vocabulary"], None),
    ("generate-ids-file-missing", ["generate", *TINY, "--input-ids", "{root}/no-ids.txt"], ["no-ids.txt", "does not exist"], None),
    ("prompt-too-long", ["generate", *TINY, "--input-ids", "{long_ids.txt}", "--max-new-tokens", "8"], ["prompt is", "--truncate"], None),
    ("forward-too-long", ["forward", *TINY, "--input-ids", ",".join(["5"] * (CONTEXT + 1))], [str(CONTEXT + 1), "context"], None),
    ("max-new-tokens-overflow", [*GEN[:-1], str(CONTEXT)], ["max_new_tokens", "context"], None),
    ("text-without-tokenizer", ["forward", *TINY, "--prompt", "hello"], ["no tokenizer", "--input-ids"], None),
    ("generate-text-without-tokenizer", ["generate", *TINY, "--prompt", "hello"], ["no tokenizer", "--input-ids"], None),
    ("chat-with-ids", [*GEN, "--chat"], ["--chat", "--input-ids"], None),
    ("compare-empty-schemes", ["compare", *TINY, "--schemes", "", "--out", "{root}/cmp-d"], ["--schemes", "empty"], "{root}/cmp-d"),
    ("compare-unknown-scheme", ["compare", *TINY, "--schemes", "tp,nope", "--out", "{root}/cmp-e"], ["nope"], "{root}/cmp-e"),
    ("plan-device-memory", ["plan", "--preset", "tiny-llama", "--device-memory", "lots"], ["lots"], None),
    # output paths: existing or unwritable, refused before any work
    ("save-logits-exists", [*FWD, "--save-logits", "{exists.npy}"], ["exists.npy", "already exists"], None),
    ("save-logits-under-file", [*FWD, "--save-logits", "{a_file}/x.npy"], ["--save-logits", "file"], "{a_file}/x.npy"),
    ("save-logits-is-dir", [*FWD, "--save-logits", "{root}"], ["--save-logits", "directory"], None),
    ("compare-out-prior-results", ["compare", *TINY, "--out", "{prior_compare}"], ["compare.csv", "already exists"], None),
    ("compare-out-under-file", ["compare", *TINY, "--out", "{a_file}/cmp"], ["--out", "file"], "{a_file}/cmp"),
    ("logdir-is-file", ["profile", *TINY, "--logdir", "{a_file}"], ["--logdir", "not a directory"], None),
    ("logdir-under-file", ["profile", *TINY, "--logdir", "{a_file}/trace"], ["--logdir", "file"], "{a_file}/trace"),
    ("logdir-unwritable", ["profile", *TINY, "--logdir", "/proc/torchax-bridge-trace"], ["--logdir", "cannot be written"], "/proc/torchax-bridge-trace"),
    ("convert-dst-exists", ["convert", "{good}", "{root}/lone"], ["lone", "already exists"], None),
    ("convert-dst-under-file", ["convert", "{good}", "{a_file}/out"], ["convert destination", "file"], "{a_file}/out"),
    ("convert-preset", ["convert", "tiny-llama", "{root}/conv-d"], ["preset", "real checkpoint"], "{root}/conv-d"),
    # check and export
    ("check-ckpt-missing", ["check", "--checkpoint", "{root}/nope", *IDS], ["not found"], None),
    ("check-ids-outside-vocab", ["check", *TINY, "--input-ids", f"1,{VOCAB}"], [str(VOCAB), "vocabulary"], None),
    ("check-tolerance-0", ["check", *TINY, "--tolerance", "0"], ["--tolerance", "positive"], None),
    ("check-unknown-scheme", ["check", *TINY, "--scheme", "nope"], ["nope"], None),
    ("export-out-exists", ["export", *TINY, "--out", "{prior_compare}"], ["prior_compare", "already exists"], None),
    ("export-out-under-file", ["export", *TINY, "--out", "{a_file}/exp"], ["--out", "file"], "{a_file}/exp"),
    ("export-past-context", ["export", *TINY, "--out", "{root}/exp-a", "--prompt-len", str(CONTEXT)], ["context", "--prompt-len"], "{root}/exp-a"),
    ("export-broken-config", ["export", "--checkpoint", "{broken_config}", "--out", "{root}/exp-b"], ["config.json"], "{root}/exp-b"),
    # train
    ("train-data-missing", ["train", *TINY, "--data", "{root}/no-text.txt"], ["--data", "no-text.txt"], None),
    ("train-no-tokenizer", ["train", *TINY, "--data", "{notes.txt}"], ["no tokenizer", "--data"], None),
    ("train-int8", ["train", *TINY, "--data", "{notes.txt}", "--quantize", "int8"], ["int8", "--quantize"], None),
    ("train-lr-0", ["train", *TINY, "--data", "{notes.txt}", "--lr", "0"], ["--lr", "positive"], None),
    ("train-steps-0", ["train", *TINY, "--data", "{notes.txt}", "--steps", "0"], ["--steps", "positive"], None),
    ("train-out-not-a-run", ["train", *TINY, "--data", "{notes.txt}", "--out", "{prior_compare}"], ["prior_compare", "no training run"], None),
    ("train-preset-out", ["train", "--checkpoint", "tiny-llama", "--devices", "1", "--data", "{notes.txt}", "--out", "{root}/tr-a"], ["preset", "--out"], "{root}/tr-a"),
    # launch
    ("launch-unknown-command", ["launch", "--", "nosuchcommand"], ["nosuchcommand"], None),
    ("launch-nothing", ["launch"], ["nothing to launch"], None),
    ("launch-devices", ["launch", "--", *FWD, "--devices", "2"], ["--devices-per-process"], None),
    ("launch-bad-child-args", ["launch", "--", "forward", "--checkpoint", "tiny-llama"], ["--prompt", "--input-ids"], None),
]


def _fill(text: str, paths: dict) -> str:
    for key, value in paths.items():
        text = text.replace("{" + key + "}", str(value))
    return text


def test_table_is_large_and_covers_every_command():
    assert len(ROWS) >= 40
    assert len({r[0] for r in ROWS}) == len(ROWS)
    commands = {r[1][0] for r in ROWS}
    assert {"forward", "generate", "shardings", "compare", "profile", "plan", "launch", "convert", "check",
            "export", "train"} <= commands  # fmt: skip


@pytest.mark.parametrize("row_id,argv,needles,out_path", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(row_id, argv, needles, out_path, inputs, capfd):
    argv = [_fill(a, inputs) for a in argv]
    out_path = Path(_fill(out_path, inputs)) if out_path else None
    files = lambda: {p: (p.stat().st_mtime_ns if p.is_file() else None) for p in inputs["root"].rglob("*")}  # noqa: E731
    before = files()
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse exits itself (with our one-line message)
        code = e.code
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("torchax-bridge: error: "), lines[0]
    for needle in needles:
        assert _fill(needle, inputs) in lines[0], (needle, lines[0])
    if out_path is not None:
        assert not out_path.exists(), out_path
    after = files()
    assert after == before, "a refused command changed files: " + str(set(after.items()) ^ set(before.items()))


def test_tokenizer_less_checkpoint_works_with_ids(inputs, capfd):
    """save_pretrained without tokenizer files: every id-taking command runs; JSON carries the ids."""
    assert cli.main(["forward", "--checkpoint", str(inputs["good"]), *IDS]) == 0
    assert "logits shape [1, 3, 320]" in capfd.readouterr().out
    assert cli.main(["generate", "--checkpoint", str(inputs["good"]), *IDS, "--max-new-tokens", "5", "--json"]) == 0
    row = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert row["prompt_ids"] == [1, 2, 3] and len(row["token_ids"]) == 5
    assert cli.main(["shardings", "--checkpoint", str(inputs["good"]), "--devices", "2"]) == 0
    assert "lm_head.weight" in capfd.readouterr().out


def test_generate_input_ids_file_is_a_batch_equal_to_single_rows(inputs, capfd, tmp_path):
    rows = [[1, 2, 3, 4, 5], [7, 8]]
    f = tmp_path / "ids.txt"
    f.write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n")
    base = ["generate", "--checkpoint", str(inputs["good"]), "--max-new-tokens", "6", "--json", "--devices", "1"]
    assert cli.main([*base, "--input-ids", str(f)]) == 0
    batch = [json.loads(line)["token_ids"] for line in capfd.readouterr().out.strip().splitlines()]
    alone = []
    for r in rows:
        assert cli.main([*base, "--input-ids", ",".join(map(str, r))]) == 0
        alone.append(json.loads(capfd.readouterr().out.strip().splitlines()[-1])["token_ids"])
    assert batch == alone


@pytest.fixture(scope="module")
def tokenizer_checkpoint(inputs, tmp_path_factory) -> Path:
    """The separate case with a tokenizer: a word-level tokenizer built in code (no hub), saved
    beside the model with save_pretrained."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 2)] + ["hello", "world"]
    vocab = {w: i for i, w in enumerate(words[:VOCAB - 2] + ["hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    d = tmp_path_factory.mktemp("with-tokenizer") / "model"
    shutil.copytree(inputs["good"], d)
    fast.save_pretrained(d)
    return d


def test_checkpoint_with_tokenizer_takes_text(tokenizer_checkpoint, capfd):
    assert cli.main(["forward", "--checkpoint", str(tokenizer_checkpoint), "--prompt", "hello world", "--devices", "1"]) == 0
    assert "logits shape [1, 2, 320]" in capfd.readouterr().out
    assert cli.main(["generate", "--checkpoint", str(tokenizer_checkpoint), "--prompt", "hello world",
                     "--max-new-tokens", "4", "--json", "--devices", "1"]) == 0  # fmt: skip
    row = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert row["prompt_ids"] == [VOCAB - 2, VOCAB - 1] and row["text"].startswith("w")


def test_compare_default_schemes_fit_and_unfit_named_scheme_is_a_row(inputs, tmp_path, capfd):
    """The tiny model has 4 query heads: tp on 8 devices cannot split them, so the default list
    leaves tp out with a note, and naming tp keeps it as a 'does not fit' row everywhere."""
    from bridge import experiments

    out = tmp_path / "cmp"
    argv = ["compare", "--checkpoint", str(inputs["good"]), "--devices", "8", "--batch", "8", "--seq", "8",
            "--repeats", "1", "--out", str(out)]  # fmt: skip
    assert cli.main([*argv, "--schemes", "replicated,tp"]) == 0
    _, err = capfd.readouterr()
    assert "[1/2] replicated" in err and "[2/2] tp: does not fit" in err
    csv_text = (out / "compare.csv").read_text()
    assert "does not fit" in csv_text and "does not fit" in (out / "compare.md").read_text()
    rows = [experiments.Row("replicated", "model=4"), experiments.Row("tp", "-", status="does not fit: x")]
    assert (out / "compare.png").stat().st_size > 0
    experiments.plot(rows, tmp_path / "p.png", "t")  # a row that does not fit keeps its slot in the plot
    from bridge import checkpoints
    import jax

    model = checkpoints.load(str(inputs["good"]), with_tokenizer=False).model
    fit, left_out = experiments.default_schemes(model, jax.devices()[:8])
    assert "tp" in dict(left_out) and "replicated" in fit and "fsdp" in fit


def test_convert_writes_normal_permissions(inputs, tmp_path, capfd):
    dst = tmp_path / "converted"
    old = os.umask(0o022)
    try:
        assert cli.main(["convert", str(inputs["good"]), str(dst), "--max-shard-size", "0.05"]) == 0
    finally:
        os.umask(old)
    assert dst.stat().st_mode & 0o777 == 0o755
    files = list(dst.iterdir())
    assert len([f for f in files if f.suffix == ".safetensors"]) > 1  # 0.05 MB shards: several files
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in files), [(f.name, oct(f.stat().st_mode)) for f in files]


def _run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True, text=True, **kw)


def test_launch_child_usage_error_is_exit_2_with_its_line(inputs):
    """A child that refuses its input: launch says that one line (exit 2), not a crash report."""
    proc = _run("launch", "--processes", "2", "--devices-per-process", "1", "--", "forward", "--checkpoint",
                str(inputs["root"] / "nope"), "--input-ids", "1,2", timeout=300)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "process" in lines[0] and "not found" in lines[0], lines


def test_sigint_exits_130_and_leaves_no_partial_output(smollm2, tmp_path):
    """Ctrl-C in the middle of writing a converted checkpoint: exit 130, one line, nothing left."""
    dst = tmp_path / "converted"
    proc = subprocess.Popen([sys.executable, "-m", "bridge", "convert", "smollm2", str(dst)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(tmp_path.glob(".converted.tmp-*")):
        time.sleep(0.01)
    assert proc.poll() is None, "convert finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip() and "it/s" not in line and "%|" not in line]
    assert proc.returncode == 130, err
    assert lines == ["torchax-bridge: interrupted"], err
    assert not dst.exists() and not list(tmp_path.iterdir())


def test_profile_runs_without_the_viewer_extra(tmp_path):
    """profile needs only the core install: with tensorboard and xprof made unimportable it writes a
    trace, prints the per-layer summary, and hints at the viewer in one line."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "for name in ('tensorboard', 'tensorboard_plugin_profile', 'xprof'):\n"
        "    sys.modules[name] = None  # import raises ImportError, as in an install without the extra\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    logdir = tmp_path / "trace"
    proc = _run("profile", "--checkpoint", "tiny-llama", "--devices", "2", "--logdir", str(logdir), "--steps", "2",
                env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert list(logdir.rglob("*.xplane.pb"))
    assert "pip install 'torchax-bridge[profile]'" in proc.stdout
    # "0.519 ms  layers.*.mlp (per layer, 2 scanned)": the scanned stack's time per layer.
    layers = [line.split()[2] for line in proc.stdout.split("time per named layer:")[1].splitlines() if line.strip()]
    assert "layers.*.mlp" in layers and layers == sorted(layers), proc.stdout
    assert "(per layer, 2 scanned)" in proc.stdout


def test_exported_runner_answers_bad_input_with_one_line(tmp_path, capfd):
    """``python -m bridge.exported``: a missing directory and one that holds no export get one line
    and exit 2 like every command (ids outside the vocabulary: tests/test_any_module.py, on a real
    export)."""
    from bridge import exported

    for path, says in [(tmp_path / "nowhere", "no directory"), (tmp_path, "holds no export")]:
        assert exported.main([str(path), "--input-ids", "1,2"]) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0] and "torchax-bridge export" in err[0], err
