"""The two published checkpoints this project is built around, opened as they are (issue 29):
Grok-1's ``ckpt-0`` (one pickle per Haiku parameter, int8 records) and GPT-NeoX-20B's slim weights
(2-way tensor-parallel ``torch.save`` partitions + ``configs/20B.yml``).

Fixtures are written in exactly those layouts at tiny widths (``grok_checkpoint.write_ckpt``,
``partitions.write_neox_slim_weights``). The reference for each is the same weights saved the plain
way and opened through our safetensors path: a ``save_pretrained`` GPT-NeoX, and the int8 Grok's
state dict written with ``checkpoints.write_checkpoint``."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from bridge import checkpoints, grok_checkpoint, partitions
from bridge.models import open_model

IDS = [1, 2, 3, 4, 5]
NEW = 8


@pytest.fixture(scope="module")
def grok(tmp_path_factory):
    """(ckpt-0's parent, the reference safetensors directory) of one int8 Grok: 2 layers, 8 query / 2
    kv heads of grok-1's width 128, 4 experts."""
    from bridge.quantize import quantize_int8
    from model_torch.grok import GrokConfig, GrokForCausalLM

    torch.manual_seed(0)
    config = GrokConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8,
                        num_kv_heads=2, head_dim=128, num_experts=4)  # fmt: skip
    model = GrokForCausalLM(config)
    checkpoints.init_random(model)
    with torch.no_grad():  # grok-1 scales its embedding by 78: strong post-norms keep the layers audible
        for name, p in model.named_parameters():
            if name.endswith(("post_attn_norm.weight", "post_moe_norm.weight")):
                p.normal_(0, 40)
    quantize_int8(model, embeddings=False)
    with torch.no_grad():  # grok-1 stores bf16 scales
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.copy_(p.bfloat16().float())
    root = tmp_path_factory.mktemp("grok")
    grok_checkpoint.write_ckpt(model, root / "checkpoints")
    reference = root / "safetensors"
    checkpoints.write_checkpoint(dict(model.state_dict()), checkpoints.grok_hf_config(config).to_dict() | {"model_type": "grok"},
                                 None, reference)  # fmt: skip
    return root / "checkpoints", reference


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    """(the slim-weights directory, the save_pretrained directory) of one GPT-NeoX."""
    import transformers as T

    torch.manual_seed(0)
    config = T.GPTNeoXConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                             intermediate_size=256, max_position_embeddings=128, rotary_pct=0.25,
                             use_parallel_residual=True, tie_word_embeddings=False, initializer_range=0.2)  # fmt: skip
    hf = T.GPTNeoXForCausalLM(config)
    root = tmp_path_factory.mktemp("neox")
    partitions.write_neox_slim_weights(hf.state_dict(), config, 2, root / "slim")
    hf.save_pretrained(root / "hf")
    return root / "slim", root / "hf"


def tokens(lifted) -> list[int]:
    from bridge.generate import Generator

    return Generator(lifted, stop_at_eos=False, after_request=()).generate_ids([IDS], NEW).token_ids[0]


@pytest.fixture(scope="module")
def references(grok, neox, devices):
    return {"grok": tokens(open_model(str(grok[1]), devices=1, with_tokenizer=False)),
            "neox": tokens(open_model(str(neox[1]), devices=1, with_tokenizer=False))}  # fmt: skip


def test_grok_ckpt_is_grok1s_layout(grok):
    """12 files a layer + 2, numbered in jax's sorted tree order; records where grok-1 has them."""
    ckpt = grok[0] / "ckpt-0"
    assert sorted(p.name for p in ckpt.iterdir()) == [f"tensor{i:05d}_000" for i in range(26)]
    paths = grok_checkpoint.haiku_paths(11)
    assert paths.index("transformer/decoder_layer_10/moe/linear/w") < paths.index("transformer/decoder_layer_2/moe/linear/w")
    assert paths[:3] == ["language_model/in_out_embed/embeddings", "language_model/rms_norm/scale",
                         "transformer/decoder_layer_0/moe/linear/w"]  # fmt: skip
    raw = (ckpt / "tensor00000_000").read_bytes()
    embed = pickle.loads(raw)
    assert isinstance(embed, np.ndarray) and embed.dtype == np.float32 and embed.shape == (256, 64)
    assert b"__main__" in (ckpt / "tensor00002_000").read_bytes() and b"QuantizedWeight8bit" in (ckpt / "tensor00002_000").read_bytes()
    query = grok_checkpoint.load_tensor(ckpt / f"tensor{paths.index('transformer/decoder_layer_0/multi_head_attention/query/w'):05d}_000")
    assert query.weight.dtype == np.int8 and query.weight.shape == (64, 8 * 128)  # [in, out]
    assert query.scales.dtype.name == "bfloat16" and query.scales.shape == (1, 8 * 128)


@pytest.mark.parametrize("which", ["grok", "neox"])
@pytest.mark.parametrize("n", [1, 2, 8])
def test_opens_as_published_and_matches_the_safetensors_path(which, n, grok, neox, references):
    published = {"grok": grok, "neox": neox}[which][0]
    lifted = open_model(str(published), devices=n, scheme="tp", with_tokenizer=False)
    assert not any(p.fallback for p in lifted.placements.values())  # every tensor split as the scheme says
    if which == "grok":  # int8 as stored, with its scales; the embedding float
        assert lifted.weights["model.embed_tokens.weight"].dtype == np.float32
        assert any(w.dtype == np.int8 for w in lifted.weights.values())
    assert tokens(lifted) == references[which]


def test_tokenizers_beside_the_weights(tmp_path):
    """grok-1's SentencePiece ``tokenizer.model`` at its repository root (encoding as sentencepiece
    itself does), NeoX's ``tokenizers`` file named by the YAML's ``vocab_file``."""
    import sentencepiece as spm
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    text = "The capital of France is Paris. Grok answers questions about the universe.\n" * 40
    (tmp_path / "corpus.txt").write_text(text)
    (tmp_path / "grok").mkdir()
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "grok" / "tokenizer"),
                                   vocab_size=60, model_type="bpe", pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                                   minloglevel=2)  # fmt: skip
    (tmp_path / "grok" / "checkpoints" / "ckpt-0").mkdir(parents=True)
    (tmp_path / "grok" / "checkpoints" / "ckpt-0" / "tensor00000_000").write_bytes(b"")
    tok = checkpoints.load_stored_tokenizer("grok", tmp_path / "grok" / "checkpoints")
    own = spm.SentencePieceProcessor(model_file=str(tmp_path / "grok" / "tokenizer.model"))
    sentence = "The capital of France is Paris."
    assert tok.encode(sentence) == own.encode(sentence) and tok.decode(own.encode(sentence)) == sentence
    assert tok.eos_token_id == 2

    words = {w: i for i, w in enumerate(["<|endoftext|>", "[UNK]", "The", "capital", "is", "Paris"])}
    backend = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = T.PreTrainedTokenizerFast(tokenizer_object=backend)
    config = T.GPTNeoXConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, tie_word_embeddings=False)  # fmt: skip
    with torch.device("meta"):
        shapes = T.GPTNeoXForCausalLM(config).state_dict()
    partitions.write_neox_slim_weights({k: torch.zeros(v.shape) for k, v in shapes.items()}, config, 2,
                                       tmp_path / "neox", tokenizer=fast)  # fmt: skip
    assert (tmp_path / "neox" / "20B_tokenizer.json").is_file()
    tok = checkpoints.load_stored_tokenizer("neox", tmp_path / "neox")
    assert tok.encode("The capital is Paris") == [2, 3, 4, 5] and tok.eos_token_id == 0


def test_plan_accepts_both(grok, neox, capsys):
    from bridge import cli

    for path in (grok[0], neox[0]):
        assert cli.main(["plan", "--checkpoint", str(path), "--devices", "8", "--scheme", "tp", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["param_bytes_per_device"] > 0 and not result["fallbacks"]


def test_convert_writes_our_safetensors(grok, neox, tmp_path, references, devices):
    for which, (published, _) in (("grok", grok), ("neox", neox)):
        dst = checkpoints.convert(str(published), tmp_path / which)
        assert (dst / "config.json").is_file() and list(dst.glob("*.safetensors"))
        assert tokens(open_model(str(dst), devices=1, with_tokenizer=False)) == references[which]


class RunsCode:
    """Unpickles into ``os.system("touch <marker>")``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_tensor_file_that_runs_code_is_refused(grok, tmp_path):
    """One line naming the file, exit 2, and the command inside never runs."""
    import shutil

    bad = tmp_path / "checkpoints"
    shutil.copytree(grok[0], bad)
    (bad / "ckpt-0" / "tensor00000_000").write_bytes(pickle.dumps(RunsCode(tmp_path / "RAN")))
    proc = subprocess.run([sys.executable, "-m", "bridge", "generate", "--checkpoint", str(bad), "--input-ids", "1,2",
                           "--max-new-tokens", "2", "--devices", "1"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tensor00000_000" in lines[0] and "refused" in lines[0] and "system" in lines[0], lines
    assert not (tmp_path / "RAN").exists()


def test_a_partition_that_runs_code_is_refused(neox, tmp_path):
    import shutil

    bad = tmp_path / "slim"
    shutil.copytree(neox[0], bad)
    victim = bad / "global_step150000" / "layer_02-model_01-model_states.pt"
    torch.save({"attention.dense.weight": RunsCode(tmp_path / "RAN")}, victim)
    with pytest.raises(checkpoints.CheckpointError, match=r"layer_02-model_01-model_states\.pt: refused"):
        open_model(str(bad), devices=1, with_tokenizer=False)
    assert not (tmp_path / "RAN").exists()


def test_neox_onto_tp2_holds_at_most_one_layer_beyond_what_is_placed(tmp_path, devices):
    """Peak resident memory while the partitions load onto tp 2, above what stays placed, is below
    one layer's tensors (the host path would hold the whole merged model: 4 layers and more)."""
    import transformers as T

    from bridge.lift import lift

    config = T.GPTNeoXConfig(vocab_size=512, hidden_size=1024, num_hidden_layers=4, num_attention_heads=8,
                             intermediate_size=4096, max_position_embeddings=64, use_parallel_residual=True,
                             tie_word_embeddings=False)  # fmt: skip
    with torch.device("meta"):
        shapes = T.GPTNeoXForCausalLM(config).state_dict()
    state = {k: torch.randn(v.shape) * 0.02 for k, v in shapes.items() if "rotary" not in k}
    partitions.write_neox_slim_weights(state, config, 2, tmp_path / "slim")
    layer_bytes = sum(v.numel() * 4 for k, v in state.items() if k.startswith("gpt_neox.layers.0."))
    del state
    import sharding

    model, stored, _ = checkpoints.open_stored("neox", tmp_path / "slim")
    mesh = sharding.mesh_for("tp", 2, devices=devices[:2])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident size
    lifted = lift(model, mesh, "tp", stored=stored)
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    peak, now = (int(status[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS"))
    assert sum(w.nbytes for w in lifted.weights.values()) > 3 * layer_bytes  # it did place the model
    assert peak - now < layer_bytes, (peak - now, layer_bytes)
