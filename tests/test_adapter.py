"""transformers' own model definitions through the bridge (``HFCausalLMAdapter``): greedy tokens
equal to transformers' ``generate`` through the jitted prefill + donated decode loop, on 1 device and
under tp on 2; logits at 1e-4; left-padded batches; tp from the model's own plan; padded vocabs.

Fixtures are tiny random models written with ``save_pretrained`` (no tokenizer), as users make them.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers as T

from jax.sharding import PartitionSpec as P

from bridge import hlo, scan
from bridge.generate import Generator
from bridge.models import open_model
from model_torch.contract import StateCache
from conftest import RTOL, TINY_MAMBA, max_rel, save

HIDDEN = dict(vocab_size=517, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip


def family_configs() -> dict:
    return {
        "llama": T.LlamaConfig(**HIDDEN),
        "gemma": T.GemmaConfig(**HIDDEN, head_dim=32),
        "gemma2": T.Gemma2Config(**HIDDEN, head_dim=32, sliding_window=8),
        "gemma3_text": T.Gemma3TextConfig(**HIDDEN, head_dim=32, sliding_window=8),
        "qwen3": T.Qwen3Config(**HIDDEN, head_dim=32),
        "phi3": T.Phi3Config(**HIDDEN, pad_token_id=0),
        "gpt2": T.GPT2Config(vocab_size=517, n_embd=128, n_layer=2, n_head=4, n_positions=256),
        "falcon": T.FalconConfig(vocab_size=517, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 new_decoder_architecture=True, num_kv_heads=2),  # fmt: skip
        "phi": T.PhiConfig(**HIDDEN),
        "qwen2_moe": T.Qwen2MoeConfig(**HIDDEN, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                                      num_experts=4, num_experts_per_tok=2),  # fmt: skip
    }


FAMILIES = list(family_configs())


@pytest.fixture(scope="module")
def checkpoints_dir(tmp_path_factory, devices):
    root = tmp_path_factory.mktemp("hf-families")
    return {name: save(cfg, root / name) for name, cfg in family_configs().items()}


def hf_reference(path: str):
    from model_torch.hf_adapter import attention_implementation

    config = T.AutoConfig.from_pretrained(path)
    return T.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention_implementation(config),
                                                  experts_implementation="batched_mm").eval()  # fmt: skip


PROMPT = [int(t) for t in np.random.default_rng(1).integers(0, 517, 12)]


def reference_tokens(hf, new_tokens: int) -> list[int]:
    """transformers' own greedy ``generate`` of ``new_tokens`` after ``PROMPT``."""
    with torch.no_grad():
        return hf.generate(torch.tensor([PROMPT]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False)[0, len(PROMPT):].tolist()  # fmt: skip


def greedy_equals_transformers(path: str, devices, new_tokens: int = 16, meshes=((1, "replicated"), (2, "tp"))):
    """Asserts greedy tokens equal transformers' ``generate`` on 1 device and under tp on 2 (or on
    ``meshes``); returns the last lift."""
    ref = reference_tokens(hf_reference(path), new_tokens)
    for n, scheme in meshes:
        lifted = open_model(path, devices=devices[:n], scheme=scheme, implementation="transformers", with_tokenizer=False)
        assert Generator(lifted, stop_at_eos=False).generate_ids([PROMPT], new_tokens).token_ids[0] == ref, (n, scheme)
    return lifted


# The default (the stack scanned where its layers are identical) on 1 device and under tp on 2, and
# every layer unrolled (``--no-scan-layers``) on 1.
@pytest.mark.parametrize("devices_n,scheme,scan_layers", [(1, "replicated", None), (2, "tp", None), (1, "replicated", False)],
                         ids=["1-replicated", "2-tp", "1-unrolled"])  # fmt: skip
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers(family, devices_n, scheme, scan_layers, checkpoints_dir):
    path = checkpoints_dir[family]
    hf = hf_reference(path)
    ref = reference_tokens(hf, 32)
    with torch.no_grad():
        ref_logits = hf(torch.tensor([PROMPT])).logits.numpy()
    lifted = open_model(path, devices=jax.devices()[:devices_n], scheme=scheme, implementation="transformers",
                        with_tokenizer=False, scan_layers=scan_layers)  # fmt: skip
    assert type(lifted.model).__name__ == "HFCausalLMAdapter"
    # scanned by default wherever the stack's layers are identical (else unrolled, for a stated reason)
    assert lifted.scan_layers == (scan_layers is None and scan.why_not_scanned(lifted.model) is None)
    gen = Generator(lifted, stop_at_eos=False)
    out = gen.generate_ids([PROMPT], 32)
    assert out.token_ids[0] == ref
    assert max_rel(np.asarray(lifted.forward([PROMPT])), ref_logits) < RTOL
    again = gen.generate_ids([PROMPT], 32)  # same bucket: compiled once
    assert again.compile_seconds == 0.0 and again.token_ids == out.token_ids


def test_llama_runs_through_the_adapter_not_model_torch(checkpoints_dir):
    auto = open_model(checkpoints_dir["llama"], devices=1, scheme="replicated", with_tokenizer=False)
    adapter = open_model(checkpoints_dir["llama"], devices=1, scheme="replicated", with_tokenizer=False,
                         implementation="transformers")  # fmt: skip
    assert type(auto.model).__module__ == "model_torch.llama"
    assert type(adapter.model).__name__ == "HFCausalLMAdapter"
    assert max_rel(np.asarray(adapter.forward([PROMPT])), np.asarray(auto.forward([PROMPT]))) < RTOL


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "qwen2_moe"])
def test_left_padded_batch_rows_equal_alone(family, checkpoints_dir):
    lifted = open_model(checkpoints_dir[family], devices=1, scheme="replicated", implementation="transformers",
                        with_tokenizer=False)  # fmt: skip
    gen = Generator(lifted, stop_at_eos=False)
    rows = [PROMPT, PROMPT[:5], PROMPT[3:10]]
    batch = gen.generate_ids(rows, 12).token_ids
    alone = [gen.generate_ids([r], 12).token_ids[0] for r in rows]
    assert batch == alone
    logits = np.asarray(lifted.fn(lifted.weights, (jax.numpy.asarray([PROMPT]),), {})[0])
    assert not np.isnan(logits).any()


@pytest.mark.parametrize("family", FAMILIES)
def test_tp_replicates_nothing_large_without_a_reason(family, checkpoints_dir):
    lifted = open_model(checkpoints_dir[family], devices=2, scheme="tp", implementation="transformers",
                        with_tokenizer=False)  # fmt: skip
    for row in lifted.report()["rows"]:
        total = int(np.prod(row["shape"])) * np.dtype(row["dtype"]).itemsize
        if total > 64 << 10 and row["replicated_because"]:
            assert "catch-all" not in row["replicated_because"], row  # replicated only by a named rule


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen3", "phi3", "gpt2"])
def test_tp_forward_has_two_all_reduces_per_layer(family, checkpoints_dir):
    """Phi-3's fused qkv_proj/gate_up_proj and GPT-2's Conv1D c_attn are split into their parts
    before placement (FusedAsParts), so they compile like Llama: no resharding between devices."""
    lifted = open_model(checkpoints_dir[family], devices=2, scheme="tp", implementation="transformers",
                        with_tokenizer=False)  # fmt: skip
    stats = hlo.compiled_stats(lifted.compiled_forward(np.zeros((1, 16), np.int32)))
    layers = lifted.model.config.num_hidden_layers
    assert 2 * layers <= stats["collectives"]["all-reduce"]["count"] <= 2 * layers + 1  # + the embedding
    assert stats["collectives"]["all-gather"]["count"] <= 1  # at most the head's logits
    assert stats["collectives"]["collective-permute"]["count"] == 0
    assert stats["collectives"]["all-to-all"]["count"] == 0


def test_sharding_follows_the_models_own_plan(checkpoints_dir, tmp_path):
    """Phi's MLP is fc1/fc2: no row of ours names them; its plan splits them. Edit the plan (the
    fc1 entry renamed to a module that does not exist) and fc1 is no longer split: the plan, not a
    hand-written row, decides."""
    lifted = open_model(checkpoints_dir["phi"], devices=2, scheme="tp", implementation="transformers",
                        with_tokenizer=False)  # fmt: skip
    assert lifted.scan_layers  # the stack is scanned: one stacked tensor per weight, placed per layer
    assert lifted.placement("model.layers.0.mlp.fc1.weight").spec == P("model")
    assert lifted.placement("model.layers.1.mlp.fc2.weight").spec == P(None, "model")
    edited = tmp_path / "phi-edited"
    import shutil

    shutil.copytree(checkpoints_dir["phi"], edited)
    config = json.loads((edited / "config.json").read_text())
    plan = T.PhiConfig().base_model_tp_plan
    plan["layers.*.mlp.fc1_renamed"] = plan.pop("layers.*.mlp.fc1")
    config["base_model_tp_plan"] = plan
    (edited / "config.json").write_text(json.dumps(config))
    lifted = open_model(str(edited), devices=2, scheme="tp", implementation="transformers", with_tokenizer=False)
    rows = {r["name"]: r for r in lifted.report()["rows"]}
    assert lifted.placement("model.layers.0.mlp.fc1.weight").spec == P()
    assert "catch-all" in rows["model.layers.*.mlp.fc1.weight"]["replicated_because"]


@pytest.mark.parametrize("vocab", [50257, 517])
@pytest.mark.parametrize("n", [2, 8])
def test_vocab_that_does_not_divide_is_padded(vocab, n, tmp_path, devices):
    config = T.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=1, n_head=8, n_positions=64)
    path = save(config, tmp_path / "gpt2")
    ids = [[5, 17, 300, 2, 9]]
    ref = np.asarray(open_model(path, devices=1, scheme="replicated", with_tokenizer=False).forward(ids))
    lifted = open_model(path, devices=n, scheme="tp", with_tokenizer=False)
    wte = lifted.placements["transformer.wte.weight"]
    assert wte.padded_from == vocab and wte.shape[0] % n == 0 and wte.spec[0] == "model"
    out = np.asarray(lifted.forward(ids))
    assert out.shape[-1] == vocab
    assert max_rel(out, ref) < RTOL
    gen_ref = Generator(open_model(path, devices=1, scheme="replicated", with_tokenizer=False), stop_at_eos=False)
    assert Generator(lifted, stop_at_eos=False).generate_ids(ids, 8).token_ids == gen_ref.generate_ids(ids, 8).token_ids


def test_int8_runs_through_the_adapter(checkpoints_dir):
    fp = open_model(checkpoints_dir["qwen3"], devices=2, scheme="tp", implementation="transformers", with_tokenizer=False)
    q = open_model(checkpoints_dir["qwen3"], devices=2, scheme="tp", implementation="transformers", quantize="int8",
                   with_tokenizer=False)  # fmt: skip
    assert any(str(w.dtype) == "int8" for w in q.weights.values())
    a, b = np.asarray(fp.forward([PROMPT])), np.asarray(q.forward([PROMPT]))
    assert max_rel(b, a) < 0.05  # int8 weights: close, not equal


def test_architectures_that_cannot_run_are_refused_with_the_reason(tmp_path, devices, capsys):
    """An encoder-decoder (T5: refused from its config, the weights never read); XLM, which reads
    ``lengths.max().item()`` of its input (data that a traced program does not have), with or
    without a cache. Exit code 2 and one line naming the model type and the reason."""
    from bridge import cli

    t5 = tmp_path / "t5"
    t5.mkdir()
    T.T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2).save_pretrained(t5)
    (t5 / "model.safetensors").write_bytes(b"")
    xlm = T.XLMConfig(vocab_size=64, emb_dim=32, n_layers=1, n_heads=2, causal=True, max_position_embeddings=64)
    for path, reasons in [(str(t5), ["'t5' is an encoder-decoder"]),
                          (save(xlm, tmp_path / "xlm"), ["'xlm' cannot decode over a cache passed in and out (it did not run one "
                                                         "token over transformers' cache", "did not run without one either"])]:  # fmt: skip
        capsys.readouterr()  # what saving the checkpoint wrote
        assert cli.main(["forward", "--checkpoint", path, "--input-ids", "1,2", "--devices", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(r in err for r in reasons), err


def test_classes_whose_cache_cannot_pass_decode_by_recomputing(tmp_path, devices, capsys):
    """OpenAI-GPT keeps no cache, RecurrentGemma keeps its recurrent state in module attributes its
    forward assigns, and MPT reads the cache's length as a Python number (its position-bias slice):
    none can decode over a cache passed in and out of a program, so each carries its token history
    instead (ids and positions, written at their columns) and every step runs the whole history.
    Greedy tokens equal transformers' on 1 device and under tp on 2; a left-padded batch's rows
    equal each row alone (each row is rolled to start at its first real token: RecurrentGemma's
    recurrence would otherwise run over the padding). The server, whose rows share cache columns,
    refuses them; ``plan`` says so."""
    from bridge import cli
    from bridge.errors import GenerationError
    from bridge.serving import Engine

    configs = {
        "wrote nothing into transformers' cache": (T.OpenAIGPTConfig(vocab_size=517, n_embd=64, n_layer=2, n_head=4,
                                                                     n_positions=64), 0.3),
        "state in module attributes its forward assigns": (T.RecurrentGemmaConfig(vocab_size=517, hidden_size=64,
                                                           intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                           num_key_value_heads=2, head_dim=16, lru_width=64,
                                                           attention_window_size=16, block_types=["recurrent", "attention"]), 0.3),
        "reads the cache's length as a Python number": (T.MptConfig(vocab_size=517, d_model=64, n_layers=2, n_heads=4,
                                                                    max_seq_len=64), 0.2),
    }  # fmt: skip
    for why, (config, std) in configs.items():  # each drawn wide enough that its tokens vary
        path = save(config, tmp_path / config.model_type, std=std)
        assert len(set(reference_tokens(hf_reference(path), 8))) > 2  # not one token over and over
        # tp 2 for the hybrid only (the sweep runs every recomputing type under tp): suite time
        meshes = ((1, "replicated"), (2, "tp")) if config.model_type == "recurrent_gemma" else ((1, "replicated"),)
        lifted = greedy_equals_transformers(path, devices, new_tokens=8, meshes=meshes)
        assert why in lifted.model.recompute_reason
        (history,) = lifted.model.init_kv_cache(2, 16, device="meta")
        assert [t.shape for t in history.recurrent] == [(2, 16)] * 2
    gen = Generator(open_model(str(tmp_path / "recurrent_gemma"), devices=1, implementation="transformers",
                               with_tokenizer=False), stop_at_eos=False)  # fmt: skip
    rows = [PROMPT, PROMPT[3:8]]
    assert gen.generate_ids(rows, 8).token_ids == [gen.generate_ids([r], 8).token_ids[0] for r in rows]
    with pytest.raises(GenerationError, match="decodes by recomputing its token history"):
        Engine(gen.lifted, slots=2, max_seq=64)  # its slots share one cache with columns
    capsys.readouterr()
    assert cli.main(["plan", "--checkpoint", str(tmp_path / "mpt"), "--devices", "1", "--seq", "32"]) == 0
    assert "note: decodes by recomputing its token history (it reads the cache's length" in capsys.readouterr().out


def test_every_program_starts_from_the_module_as_built(tmp_path, devices):
    """RWKV rescales two weights per layer in place on its first eval call and flips a flag that
    halves its hidden states from then on. Traced, the rescaling stays inside the first program,
    so the adapter puts back what a forward assigns to module attributes (tensors and plain values)
    and every program rescales for itself: two forwards of different lengths (two programs) give
    transformers' logits (fp32, 1e-4; the second had lacked the rescaling)."""
    config = T.RwkvConfig(vocab_size=517, hidden_size=64, num_hidden_layers=2, attention_hidden_size=64,
                          intermediate_size=128, rescale_every=1, context_length=64)  # fmt: skip
    path = save(config, tmp_path / "rwkv", std=0.3)
    hf = hf_reference(path)
    lifted = open_model(path, devices=1, implementation="transformers", with_tokenizer=False)
    for ids in (PROMPT, PROMPT[:5]):
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits.numpy()
        assert max_rel(np.asarray(lifted.forward([ids])), want) < RTOL


def test_fewer_kv_heads_than_the_axis_through_the_adapter(tmp_path, devices):
    """transformers' Llama with 8 query and 2 kv heads under tp on 8 devices: each kv head repeated
    onto the 4 devices whose query heads use it (k/v per device 1/2 of the full projection), the
    module's num_key_value_groups adjusted only while tracing; equal to 1 device."""
    cfg = T.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    path = save(cfg, tmp_path / "llama-gqa")
    one = open_model(path, devices=1, scheme="replicated", implementation="transformers", with_tokenizer=False)
    tp = open_model(path, devices=8, scheme="tp", implementation="transformers", with_tokenizer=False)
    assert tp.kv_head_copies == 4
    k = tp.placement("model.layers.0.self_attn.k_proj.weight")
    assert k.shape[0] == 4 * 2 * 8 and k.bytes_per_device({"model": 8}) * 2 == 2 * 8 * 64 * 4
    prompt = [t % 256 for t in PROMPT]
    ids = [prompt[:9], prompt[2:12]]
    assert max_rel(np.asarray(tp.forward([prompt])), np.asarray(one.forward([prompt]))) < RTOL
    a = Generator(tp, stop_at_eos=False).generate_ids(ids, 10).token_ids
    assert a == Generator(one, stop_at_eos=False).generate_ids(ids, 10).token_ids
    attn = tp.model.get_submodule("model.layers.0.self_attn")
    assert attn.num_key_value_groups == 4  # restored after tracing


def test_classes_without_sdpa_run_their_eager_attention(tmp_path, devices):
    """A class that offers no SDPA path (GPT-J, CodeGen, BLOOM, GPT-Neo, MPT, ...) runs its own eager
    attention, lowered by torchax op by op. GPT-J also moves its sin/cos table to the input's
    device inside forward, which must not leave a meta tensor behind after the adapter's meta-device
    probe, and its head has a bias, padded with the vocabulary under tp (517 rows on 2 devices).
    Greedy tokens equal transformers' on 1 device and under tp on 2."""
    from model_torch.hf_adapter import attention_implementation

    family = "gptj"
    config = T.GPTJConfig(vocab_size=517, n_embd=128, n_layer=2, n_head=4, rotary_dim=16, n_positions=256,
                          bos_token_id=1, eos_token_id=2)  # fmt: skip
    assert attention_implementation(config) == "eager"
    path = save(config, tmp_path / family)
    greedy_equals_transformers(path, devices)


def test_composite_config_reads_the_text_models_settings(tmp_path, devices):
    """Gemma-3 saved as its multimodal class (``Gemma3Config`` with ``text_config`` and a vision
    tower): the vocabulary and context come from the text model's config (the top-level config has
    neither), and text-only greedy tokens equal transformers' on 1 device and under tp on 2."""
    text = dict(HIDDEN, head_dim=32, sliding_window=8)
    # The vision tower's heads are as wide as the text model's (32): tp judges every attention
    # projection by the text model's head size (the tower's own config is not read yet).
    vision = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    config = T.Gemma3Config(text_config=text, vision_config=vision)
    assert not hasattr(config, "max_position_embeddings")
    path = save(config, tmp_path / "gemma3")
    lifted = greedy_equals_transformers(path, devices)
    assert (lifted.model.vocab_size, lifted.model.context_length) == (517, 256)


def test_a_forward_that_reads_its_masks_data_is_probed(tmp_path, devices):
    """BioGPT builds its own padding mask, and transformers' SDPA mask reads its data (a shortcut
    taken when every column is real: an ``.item()``), which a meta tensor cannot answer: the
    adapter's probe of the cache layout runs on fake tensors, which transformers treats as a trace.
    Greedy tokens equal transformers' on 1 device and under tp on 2."""
    config = T.BioGptConfig(vocab_size=517, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=256)  # fmt: skip
    greedy_equals_transformers(save(config, tmp_path / "biogpt"), devices, new_tokens=8)


def test_a_bidirectional_class_never_sees_the_caches_empty_columns(tmp_path, devices):
    """RoBERTa as a causal LM with its default ``is_decoder=False`` attends bidirectionally, under
    a padding mask only: the adapter hides the cache columns past the current call whatever the
    mask says (the prefill had attended to them as zeros, and the first token differed from its own
    forward's). Greedy tokens equal transformers' on 1 device and under tp on 2."""
    # vocab 517 (odd): RoBERTa's head keeps its bias as a tensor of its own beside a head tied to the
    # embedding; under tp it is padded with the embedding's rows (it had failed to broadcast)
    config = T.RobertaConfig(vocab_size=517, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=256)  # fmt: skip
    assert not config.is_decoder
    greedy_equals_transformers(save(config, tmp_path / "roberta"), devices, new_tokens=8)


def test_a_mamba_decodes_through_its_state_cache(tmp_path, devices):
    """Mamba keeps a convolution window and an SSM state per layer instead of keys and values: the
    adapter passes them in and returns them as a ``StateCache`` (allocated, sharded by batch and
    donated like a KV pair); a one-token step takes the layer's recurrent path, the prefill its
    full-sequence scan. Greedy tokens equal transformers' on 1 device and under tp on 2; the stack
    runs unrolled, for the reason ``why_not_scanned`` gives."""
    path = save(T.MambaConfig(**TINY_MAMBA), tmp_path / "mamba", std=0.3)
    assert len(set(reference_tokens(hf_reference(path), 8))) > 2  # not one token over and over
    lifted = greedy_equals_transformers(path, devices, new_tokens=8)
    cache = lifted.model.init_kv_cache(2, 16, device="meta")
    assert all(isinstance(layer, StateCache) and not layer.kv and layer.conv and layer.recurrent for layer in cache)
    assert not lifted.scan_layers and "recurrent state" in scan.why_not_scanned(lifted.model)


def test_a_hybrid_of_convolution_and_attention_layers(tmp_path, devices):
    """LFM-3 alternates short convolutions (a state cache) with attention (a KV cache) in one stack:
    each layer's cache takes its own form, and attention masks cover the cache columns while the
    convolutions read the prefill's own padding. Greedy tokens equal transformers' on 1 device and
    under tp on 2."""
    config = T.Lfm3Config(vocab_size=517, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8,
                          layer_types=["conv", "full_attention", "conv"], pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    path = save(config, tmp_path / "lfm3", std=0.1)
    assert len(set(reference_tokens(hf_reference(path), 8))) > 2
    lifted = greedy_equals_transformers(path, devices, new_tokens=8)
    kinds = [type(layer).__name__ for layer in lifted.model.init_kv_cache(1, 16, device="meta")]
    assert kinds == ["StateCache", "tuple", "StateCache"]


def test_layers_with_their_own_head_dims_split_whole_heads_under_tp(tmp_path, devices):
    """Inkling-2's sliding layers have heads of 48 and its global layers heads of 16, and every
    layer keeps a linear-attention state beside its keys and values (``hybrid`` layers): tensor
    parallelism keeps each layer's heads whole by that layer's own head dim (the first layer's
    head dim for all refused the split: 32 rows per device are not whole heads of 48). Greedy
    tokens equal transformers' under tp on 2 (on 1 device: the sweep's row)."""
    config = T.AutoConfig.for_model("inkling2_text", vocab_size=517, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, swa_num_attention_heads=4,
                                    swa_num_key_value_heads=2, swa_head_dim=48, sliding_window_size=8,
                                    layer_types=["hybrid_sliding", "hybrid"], max_position_embeddings=256,
                                    moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    lifted = greedy_equals_transformers(save(config, tmp_path / "inkling2"), devices, new_tokens=8, meshes=[(2, "tp")])
    shapes = lifted.model.cache_shapes()
    assert [s.kv[2] for s in shapes] == [48, 16] and all(s.conv or s.recurrent for s in shapes)


def test_a_sparse_attention_indexer_keeps_its_keys_in_the_cache(tmp_path, devices):
    """DeepSeek-V3.2's layers pick the 8 keys each query attends to with an indexer whose own keys
    are cached beside the layer's keys and values (transformers' ``StaticIndexedLayer``): the
    adapter's cache holds them as a third tensor, [batch, max_seq, dim], written at the same
    columns, split by batch. With a 12-token prompt the choice is real (8 of 12+ keys), so a wrong
    indexer cache changes the tokens; 8 indexer heads and wider weights, so that no two columns'
    ReLU'd scores tie at exactly zero (torch and XLA break a tie in top-k differently: with 2 heads
    they did). Greedy tokens equal transformers' on 1 device and under tp on 2."""
    config = T.AutoConfig.for_model("deepseek_v32", vocab_size=517, hidden_size=64, intermediate_size=128,
                                    moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                                    qk_nope_head_dim=8, v_head_dim=16, head_dim=8, index_head_dim=16, index_n_heads=8,
                                    index_topk=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                    first_k_dense_replace=1, n_shared_experts=1, max_position_embeddings=256,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    lifted = greedy_equals_transformers(save(config, tmp_path / "deepseek_v32", std=0.2), devices, new_tokens=8)
    cache = lifted.model.init_kv_cache(2, 32, device="meta")
    assert [tuple(t.shape) for t in cache[0]][2] == (2, 32, 16)
    from bridge import kv_cache

    assert kv_cache.beyond_pairs(lifted.model) == "a sparse-attention indexer's keys"


def test_code_guarded_for_compilers_takes_its_graph_path(tmp_path, devices):
    """XGLM grows its sinusoidal position table when a call reaches past it, a Python branch on the
    cache length that transformers skips while torch compiles (``is_torchdynamo_compiling()``); the
    bridge's trace sets torch's compiling flag as torch.export's does, so the branch is skipped
    (it had failed on a traced bool). Greedy tokens equal transformers' on 1 device and under tp on 2."""
    config = T.XGLMConfig(vocab_size=517, d_model=64, ffn_dim=128, num_layers=2, attention_heads=4,
                          max_position_embeddings=256)  # fmt: skip
    greedy_equals_transformers(save(config, tmp_path / "xglm"), devices, new_tokens=8)
    assert not torch.compiler.is_compiling()  # eager torch as it was, after the trace


def test_experts_that_route_by_nonzero_run_on_padded_index_lists(tmp_path, devices):
    """DBRX's experts loop over ``nonzero()`` of the experts hit and ``torch.where`` of each one's
    tokens, then ``index_add_`` the results: data-dependent shapes. Under the bridge's trace those
    lists have a static size, padded with indices past the end, whose rows the scatter drops (the
    adapter names such modules: ``index_routed_experts``). The attention config carries rope_theta
    and clip_qkv as every DBRX checkpoint does (transformers' defaults do not run). Greedy tokens
    equal transformers' on 1 device and under tp on 2.

    LongCat-Flash's loop reads each expert's index as a number (``int(expert.item())``, to send its
    zero experts to an identity): there the experts hit are every expert, a constant that stays one
    inside the module, so the loop unrolls over all of them (1 device; its two attentions per layer
    keep two caches, so its stack runs unrolled)."""
    config = T.DbrxConfig(vocab_size=517, d_model=64, n_heads=4, n_layers=2, max_seq_len=256,
                          attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                          ffn_config=dict(ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2))  # fmt: skip
    lifted = greedy_equals_transformers(save(config, tmp_path / "dbrx"), devices, new_tokens=8)
    assert [type(m).__name__ for m in lifted.model.index_routed_experts()] == ["DbrxExperts"] * 2
    longcat = T.LongcatFlashConfig(vocab_size=517, hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=256, ffn_hidden_size=128, q_lora_rank=32, kv_lora_rank=16,
                                   qk_nope_head_dim=8, qk_rope_head_dim=8, head_dim=8, v_head_dim=16, moe_topk=2,
                                   n_routed_experts=4, zero_expert_num=2, expert_ffn_hidden_size=64)  # fmt: skip
    path = save(longcat, tmp_path / "longcat", std=0.1)
    assert len(set(reference_tokens(hf_reference(path), 8))) > 2
    lifted = greedy_equals_transformers(path, devices, new_tokens=8, meshes=((1, "replicated"),))
    assert "4 caches for 2 layers" in scan.why_not_scanned(lifted.model)


def test_a_per_head_gate_splits_with_its_heads_under_tp(tmp_path, devices):
    """Laguna gates each attention head's output by one scalar (``g_proj``: [heads, hidden], one
    row per query head): under tp its rows split with the heads, one row each, where every other
    attention tensor keeps head_dim rows per head (it had refused: 2 rows per device are not whole
    heads of 16). Greedy tokens equal transformers' under tp on 2 (on 1 device: the sweep's row)."""
    config = T.AutoConfig.for_model("laguna", vocab_size=517, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                                    moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=4,
                                    num_experts_per_tok=2, layer_types=["full_attention"] * 2,
                                    num_attention_heads_per_layer=[4, 4], mlp_layer_types=["dense", "sparse"],
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    lifted = greedy_equals_transformers(save(config, tmp_path / "laguna"), devices, new_tokens=8, meshes=[(2, "tp")])
    gate = lifted.placement("model.layers.0.self_attn.g_proj.weight")
    assert gate.shape == (4, 64) and gate.bytes_per_device({"model": 2}) * 2 == 4 * 64 * 4


def test_layers_that_read_another_layers_cache(tmp_path, devices):
    """Gemma-3n's last layers keep no cache: each reads the keys and values of the last earlier
    layer of its kind (KV sharing: transformers' ``DummyLayer`` in the cache). Its first layer also
    builds a ``torch.distributions.Normal`` (a data check, off while tracing) and casts with
    ``type_as`` a view (torchax cast the tensor itself in place, and failed on the view). Greedy
    tokens equal transformers' on 1 device and under tp on 2."""
    config = T.AutoConfig.for_model("gemma3n_text", vocab_size=517, hidden_size=64, intermediate_size=[128] * 4,
                                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    max_position_embeddings=256, sliding_window=8, num_kv_shared_layers=2,
                                    layer_types=["sliding_attention", "full_attention"] * 2, vocab_size_per_layer_input=517,
                                    hidden_size_per_layer_input=16, activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0],
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    lifted = greedy_equals_transformers(save(config, tmp_path / "gemma3n"), devices, new_tokens=8)
    kinds = [bool(s.kv) for s in lifted.model.cache_shapes()]
    assert kinds == [True, True, False, False]
