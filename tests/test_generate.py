"""Generation engine: greedy equals HF generate token for token; sampling; batching; errors."""


import numpy as np
import pytest
import torch
import transformers

import model_torch
import sharding
from bridge.generate import GenerationError, Generator, Sampling
from bridge.lift import lift


def hf_twin(preset: str):
    """A transformers model and our model_torch model with identical random weights."""
    torch.manual_seed(0)
    ours = model_torch.from_preset(preset).eval()
    c = ours.config
    if preset == "tiny-neox":
        hc = transformers.GPTNeoXConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
            rotary_pct=c.rotary_pct, max_position_embeddings=c.max_position_embeddings, initializer_range=0.2)  # fmt: skip
        hf = transformers.GPTNeoXForCausalLM(hc)
    elif preset == "tiny-mixtral":
        hc = transformers.MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
            num_key_value_heads=c.num_kv_heads, num_local_experts=c.num_experts, max_position_embeddings=256,
            initializer_range=0.2)  # fmt: skip
        hf = transformers.MixtralForCausalLM(hc)
    else:
        hc = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
            num_key_value_heads=c.num_kv_heads, max_position_embeddings=256, initializer_range=0.2)  # fmt: skip
        hf = transformers.LlamaForCausalLM(hc)
    hf.eval()
    ours = model_torch.config_from_hf(hc)  # rebuilt from the HF config: its defaults (rope_theta) rule
    ours = ours[0](ours[1]).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def hf_greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)  # fmt: skip
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-neox", "tiny-mixtral"])
@pytest.mark.parametrize("n_devices", [1, 8])
def test_greedy_matches_hf_generate(preset, n_devices, devices):
    hf, ours = hf_twin(preset)
    prompt = list(range(3, 20))
    want = hf_greedy(hf, prompt, 64)
    gen = Generator(lift(ours, sharding.mesh_for("tp", n_devices, devices=devices), "tp"), eos_token_ids=[])
    gen.eos = gen.eos[:0] - 1
    got = gen.generate_ids([prompt], 64).token_ids[0]
    assert got == want


def test_smollm2_greedy_matches_hf_generate_and_says_paris(smollm2, devices):
    from bridge import checkpoints

    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints.smollm2_dir(), dtype=torch.float32).eval()
    gen = Generator(lift(smollm2.model, sharding.mesh_for("tp", 1, devices=devices), "tp"), smollm2.tokenizer)
    ids = gen.encode("What is the capital of France?", chat=True)
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)[0, len(ids) :].tolist()
    out = gen.generate_ids([ids], 64)
    assert out.token_ids[0] == want
    assert "Paris" in gen.decode(out.token_ids[0])


def tiny_generator(devices, n=1, scheme="tp"):
    torch.manual_seed(0)
    model = model_torch.from_preset("tiny-llama").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return Generator(lift(model, sharding.mesh_for(scheme, n, devices=devices), scheme), eos_token_ids=[])


def test_sampling_seeds_topk_and_temperature_zero(devices):
    gen = tiny_generator(devices)
    prompt = [[5, 6, 7, 8]]
    hot = Sampling(temperature=1.0)
    a = gen.generate_ids(prompt, 32, hot, seed=1).token_ids
    b = gen.generate_ids(prompt, 32, hot, seed=1).token_ids
    c = gen.generate_ids(prompt, 32, hot, seed=2).token_ids
    assert a == b and a != c
    greedy = gen.generate_ids(prompt, 32).token_ids
    assert gen.generate_ids(prompt, 32, Sampling(temperature=1.0, top_k=1), seed=3).token_ids == greedy
    assert gen.generate_ids(prompt, 32, Sampling(temperature=0.0, top_p=0.5), seed=4).token_ids == greedy
    # top-p: with a tiny nucleus only the top token survives -> greedy again
    assert gen.generate_ids(prompt, 32, Sampling(temperature=1.0, top_p=1e-6), seed=5).token_ids == greedy


def test_top_k_and_top_p_filters_restrict_the_draw():
    import jax
    import jax.numpy as jnp

    from bridge.generate import sample_logits

    logits = jnp.asarray([[0.0, 1.0, 2.0, 3.0, 4.0]] * 64)
    keys = jax.random.split(jax.random.key(0), 50)
    draws = {int(t) for k in keys for t in sample_logits(logits, k, Sampling(1.0, top_k=2))}
    assert draws == {3, 4}
    # softmax masses 0.64, 0.23, 0.09, ...: top_p 0.6 keeps only the top token, 0.85 keeps {4, 3}
    draws = {int(t) for k in keys for t in sample_logits(logits, k, Sampling(1.0, top_p=0.6))}
    assert draws == {4}
    draws = {int(t) for k in keys for t in sample_logits(logits, k, Sampling(1.0, top_p=0.85))}
    assert draws == {3, 4}


def test_batch_of_different_lengths_equals_one_by_one(devices):
    gen = tiny_generator(devices, 8, "dp_tp")
    prompts = [[1, 2, 3], list(range(10, 30)), [7], list(range(40, 49))]
    batch = gen.generate_ids(prompts, 16).token_ids
    for p, got in zip(prompts, batch):
        assert got == gen.generate_ids([p], 16).token_ids[0]


def test_each_row_stops_at_its_own_eos(devices):
    gen = tiny_generator(devices)
    prompts = [[1, 2, 3], [9, 8, 7, 6]]
    free = gen.generate_ids(prompts, 16).token_ids
    eos = free[0][4]  # make row 0's fifth token an end-of-sequence token
    gen.eos = np.asarray([eos])
    import jax.numpy as jnp

    gen.eos = jnp.asarray([eos], jnp.int32)
    stopped = gen.generate_ids(prompts, 16).token_ids
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    assert stopped[1] == (free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1])


def test_streaming_yields_the_same_tokens(devices):
    gen = tiny_generator(devices)
    seen = []
    out = gen.generate_ids([[4, 5, 6]], 12, on_token=lambda t: seen.append(int(t[0])))
    assert seen == out.token_ids[0] == gen.generate_ids([[4, 5, 6]], 12).token_ids[0]


def test_compiles_are_cached_per_bucket(devices):
    gen = tiny_generator(devices)
    gen.generate_ids([[1, 2, 3]], 8)
    n = len(gen._compiled)
    gen.generate_ids([[4, 5, 6, 7, 8]], 8)  # same bucket (16), same cache length
    assert len(gen._compiled) == n and gen.last_compile_seconds == 0.0


@pytest.mark.parametrize("scheme", ["replicated", "tp", "fsdp", "dp", "dp_tp", "ep", "ep_tp"])
def test_sharded_generation_equals_unsharded_for_every_scheme(devices, scheme):
    torch.manual_seed(0)
    model = model_torch.from_preset("tiny-mixtral").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12]]
    ref = Generator(lift(model, sharding.mesh_for("replicated", 1, devices=devices), "replicated"), eos_token_ids=[])
    gen = Generator(lift(model, sharding.mesh_for(scheme, 8, devices=devices), scheme), eos_token_ids=[])
    assert gen.generate_ids(prompts, 12).token_ids == ref.generate_ids(prompts, 12).token_ids


def test_kv_cache_lives_on_the_mesh_with_heads_split(devices):
    gen = tiny_generator(devices, 8)
    from bridge import kv_cache

    spec = kv_cache.placement(gen.lifted, 1).spec
    assert gen.lifted.scan_layers and spec[0] is None  # one stacked cache, the layer dim unsharded
    assert spec[2] == "model"  # 8 kv heads over model=8


def test_too_long_prompt_and_cache_overflow_are_clear_errors(devices, capsys):
    gen = tiny_generator(devices)  # context 256
    with pytest.raises(GenerationError, match="--truncate"):
        gen.generate_ids([list(range(250))], 16)
    out = gen.generate_ids([[i % 200 for i in range(250)]], 16, truncate=True)
    assert len(out.prompt_ids[0]) == 240 and out.truncated_to == 240
    assert capsys.readouterr().out == ""  # library code never prints: the truncation is in the result
    with pytest.raises(GenerationError, match="overflows the model context"):
        gen.generate_ids([[1, 2]], 300)
    with pytest.raises(GenerationError, match="no tokens"):
        gen.generate_ids([[]], 4)


def test_new_sampling_values_compile_nothing(devices):
    """Temperature, top-k and top-p are traced values: a second request of the same shape and
    sampling mode with other values compiles nothing, and gives what a fresh Generator gives."""
    gen = tiny_generator(devices)
    prompt = [[1, 2, 3, 4, 5]]
    first = gen.generate_ids(prompt, 16, Sampling(temperature=0.7, top_k=40, top_p=0.9), seed=3)
    assert first.compile_seconds > 0
    again = gen.generate_ids(prompt, 16, Sampling(temperature=1.3, top_k=7, top_p=0.95), seed=3)
    assert again.compile_seconds == 0.0
    fresh = tiny_generator(devices).generate_ids(prompt, 16, Sampling(temperature=1.3, top_k=7, top_p=0.95), seed=3)
    assert again.token_ids == fresh.token_ids


def test_every_way_in_returns_one_generation(devices):
    """Token ids in or text in, one result type: the same rows and timings, JSON rows as the CLI prints."""
    from bridge.generate import Generation

    gen = tiny_generator(devices)
    by_ids = gen.generate_ids([[5, 6, 7], [8, 9]], 4)
    by_rows = gen.generate_from_ids([[5, 6, 7], [8, 9]], 4)
    assert isinstance(by_ids, Generation) and isinstance(by_rows, Generation)
    assert by_rows.token_ids == by_ids.token_ids and by_rows.prompt_ids == [[5, 6, 7], [8, 9]]
    rows = by_rows.rows()
    assert [r["token_ids"] for r in rows] == by_ids.token_ids
    assert rows[0]["text"] == " ".join(map(str, by_ids.token_ids[0]))  # no tokenizer: the ids joined
    assert rows[0]["prompt"] == "5 6 7" and rows[1]["decode_seconds"] == by_rows.decode_seconds
