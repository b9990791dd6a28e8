"""Every decoder-only type in transformers' causal-LM mapping through the bridge, against
transformers' own greedy ``generate`` (not part of ``make test``: minutes).

For each model type: a tiny config (the type's defaults with widths, depth, heads, experts and
vocabulary shrunk, in its text config too for composite ones; per-layer lists and overrides follow
the depth; ``CHECKPOINT_FIELDS``: what real checkpoints set and the defaults leave unset), random weights written with
``save_pretrained`` (no tokenizer, as users make fixtures), transformers' greedy ``generate`` of 8
tokens, then ``open_model(..., implementation="transformers")`` + ``Generator`` on 1 device, and on
2 devices under tp for the types equal on 1. Each type runs in its own process (a crash or a hang
in one is that type's row, ``--timeout`` seconds at most), ``--jobs`` at a time. Writes
``benchmarks/results/decoder_sweep.json`` and ``decoder_sweep.md`` (one row per type: equal on 1
device, equal under tp 2, or the reason).

    python benchmarks/decoder_sweep.py [--jobs 2] [--timeout 240] [--types llama,gptj] [--no-tp]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [5, 17, 42, 99, 7, 63, 11, 250, 31, 8, 77, 120]
SMALL = {  # field -> value, wherever a config (or its text config) has the field
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "model_dim": 64,
    "intermediate_size": 128, "n_inner": 128, "ffn_dim": 128, "ffn_hidden_size": 128, "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64, "expert_intermediate_size": 64,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "num_kv_heads": 2, "n_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 16, "kv_channels": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "qk_head_dim": 16, "v_head_dim": 16,
    "q_lora_rank": 32, "kv_lora_rank": 16, "index_head_dim": 16, "index_n_heads": 2,
    "vocab_size": 512, "padded_vocab_size": 512, "vocab_size_per_layer_input": 512, "hidden_size_per_layer_input": 16,
    "attention_hidden_size": 64, "embedding_dim": 64,
    "max_position_embeddings": 256, "n_positions": 256, "max_seq_len": 256, "seq_length": 256,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "zero_expert_num": 2,
    "sliding_window": 8, "rotary_dim": 8, "partial_rotary_factor": 0.5,
}


# Hybrid families whose validators reject the generic shrink (layer patterns, head products): their
# tiny configs written out, each with a state layer and an attention layer.
_MAMBA2_HEADS = dict(mamba_n_heads=8, mamba_d_head=16, mamba_expand=2, mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=16)
OVERRIDES = {
    "mamba2": dict(hidden_size=64, num_heads=8, head_dim=16, expand=2, state_size=16, n_groups=1, num_hidden_layers=2,
                   conv_kernel=4, chunk_size=16),
    "jamba": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1,
                  expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, num_attention_heads=4,
                  num_key_value_heads=2, mamba_d_state=8, mamba_expand=2, mamba_dt_rank=8),
    "bamba": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  attn_layer_indices=[1], **_MAMBA2_HEADS),
    "granitemoehybrid": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, layer_types=["mamba", "attention"], num_local_experts=4,
                             num_experts_per_tok=2, **_MAMBA2_HEADS),
    "nemotron_h": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, hybrid_override_pattern="M*-", mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16,
                       n_groups=1, chunk_size=16),
    "zamba2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                   mamba_d_state=16, mamba_headdim=16, n_mamba_heads=8, hybrid_layer_ids=[1], layers_block_type=["mamba", "hybrid"],
                   mamba_ngroups=1, chunk_size=16, use_mem_rope=False),
    "recurrent_gemma": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, lru_width=64, attention_window_size=16,
                            block_types=["recurrent", "attention"]),
}  # fmt: skip

# Fields that every real checkpoint of the family sets and whose class defaults leave unset or do not
# run (transformers 5.23: DBRX's attention reads rope_theta and clamps by clip_qkv, neither defaulted;
# Ministral's and Hunyuan's head_dim, Nemotron's kv heads, Dots-1's experts, LFM2-MoE's layer types
# are None), after the shrink; a dict is a sub-config's fields. Gemma-3n keeps 4 layers: its last
# ones read the first ones' KV cache (KV sharing), which 2 layers cannot show.
CHECKPOINT_FIELDS = {
    "dbrx": {"attn_config": dict(kv_n_heads=2, rope_theta=500000.0, clip_qkv=8.0),
             "ffn_config": dict(ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2)},
    "ministral": dict(head_dim=16), "hunyuan_v1_dense": dict(head_dim=16), "hunyuan_v1_moe": dict(head_dim=16),
    "nemotron": dict(num_key_value_heads=2), "dots1": dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "gemma3n_text": dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2,
                         activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0], intermediate_size=[128] * 4),
}  # fmt: skip


def tiny_config(model_type: str):
    import transformers as T

    if model_type in OVERRIDES:
        return T.AutoConfig.for_model(model_type, vocab_size=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                      **OVERRIDES[model_type])  # fmt: skip
    config = T.AutoConfig.for_model(model_type)
    targets = [config]
    for name in ("text_config", "llm_config", "language_config"):
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            targets.append(sub)
    layer_types = {c.model_type: list(v) for c in targets if isinstance(v := _get(c, "layer_types"), list)}
    for c in targets:
        depth = next((d for f in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if isinstance(d := _get(c, f), int)), None)
        for field, value in SMALL.items():
            old = _get(c, field)
            if isinstance(old, (int, float)) and not isinstance(old, bool):
                # top-k is never raised above the default: top-1 families validate their k (ZAYA)
                _set(c, field, min(old, value) if field in ("num_experts_per_tok", "moe_topk") else value)
        for field, v in c.to_dict().items():  # per-layer lists (layer_types, mlp_layer_types, ...) follow the
            # new depth, keeping one layer of each of the first two kinds (a hybrid stays hybrid)
            if isinstance(v, list) and v and len(v) == depth and not isinstance(v[0], (list, dict)):
                kinds = list(dict.fromkeys(v))
                per_layer_size = field if field in SMALL else next((f for f in SMALL if field.startswith(f + "_per_layer")), None)
                _set(c, field, [SMALL[per_layer_size]] * 2 if per_layer_size else (kinds + kinds)[:2])
        if isinstance(_get(c, "kv_lora_rank"), int) and isinstance(_get(c, "num_key_value_heads"), int):
            # MLA (DeepSeek-V2-style): keys are per query head, and the family's configs say so; its
            # head_dim is the rotary part's (the rotary tables are built from it)
            _set(c, "num_key_value_heads", _get(c, "num_attention_heads"))
            if isinstance(_get(c, "head_dim"), int):
                _set(c, "head_dim", _get(c, "qk_rope_head_dim"))
        for field in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            if isinstance(token := _get(c, field), int):
                _set(c, field, min(token, 3))
    for name, value in CHECKPOINT_FIELDS.get(model_type, {}).items():
        if isinstance(value, dict):
            for field, v in value.items():
                setattr(getattr(config, name), field, v)
        else:
            setattr(config, name, value)
    if model_type in CHECKPOINT_FIELDS or any(c.to_dict().get("per_layer_config") for c in targets):
        return _rebuilt(config, layer_types)
    return config


def _rebuilt(config, layer_types: dict):
    """The config made again from its dict: what a config derives when it is made (per-layer views,
    DBRX's ffn_config.hidden_size from d_model) follows the shrunk fields. Per-layer overrides
    (Gemma-4's global layers, Dots-3's MLA layers), keyed by the default depth's layer index, become
    the kept layers' own, shrunk like the rest."""
    import transformers as T

    def kept(d: dict) -> None:
        overrides, types = d.get("per_layer_config"), layer_types.get(d.get("model_type"))
        if not overrides or not types:
            return
        kinds = list(dict.fromkeys(types))
        new = {}
        for i, j in enumerate(types.index(k) for k in (kinds + kinds)[:2]):
            over = next((v for k, v in overrides.items() if int(k) == j), None)
            if over:
                new[f"{i:02d}"] = {f: SMALL[f] if f in SMALL and isinstance(v, (int, float)) else v for f, v in over.items()}
                if "kv_lora_rank" in over and "num_attention_heads" in over:  # MLA, as above
                    new[f"{i:02d}"]["num_key_value_heads"] = new[f"{i:02d}"]["num_attention_heads"]
        d["per_layer_config"] = new

    d = config.to_dict()
    kept(d)
    for sub in d.values():
        if isinstance(sub, dict) and "model_type" in sub:
            kept(sub)
    return T.AutoConfig.for_model(d.pop("model_type"), **{k: v for k, v in d.items() if k != "transformers_version"})


def _get(config, field: str):
    try:
        return getattr(config, field, None)
    except Exception:  # noqa: BLE001 - a per-layer field read globally (Gemma-4's head_dim): left as it is
        return None


def _set(config, field: str, value) -> None:
    try:
        setattr(config, field, value)
    except (AttributeError, TypeError, ValueError):  # a derived property: the config computes it
        pass


def run_one(model_type: str, tp: bool) -> dict:
    """In a fresh process: build, save, compare. The row as a dict."""
    import numpy as np  # noqa: F401
    import torch
    import transformers as T

    row = {"type": model_type}
    try:
        config = tiny_config(model_type)
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(config)
        # A Linear the class initializes to zeros (AFMoE's router) is drawn like the rest: a real
        # checkpoint's is never zero, and a zero router scores every expert the same, a top-k tie
        # that torch and XLA break differently (AFMoE differed from the first token).
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Linear) and not m.weight.any():
                    m.weight.normal_(0, 0.02)
    except Exception as e:  # noqa: BLE001 - the row says why
        return {**row, "built": False, "reason": f"tiny config not built: {type(e).__name__}: {str(e)[:160]}"}
    row["built"] = True
    with tempfile.TemporaryDirectory() as d:
        try:
            model.save_pretrained(d)
            from model_torch.hf_adapter import attention_implementation

            hf = T.AutoModelForCausalLM.from_pretrained(d, attn_implementation=attention_implementation(config),
                                                        experts_implementation="batched_mm").eval()  # fmt: skip
            ids = torch.tensor([[t % config.get_text_config(decoder=True).vocab_size for t in PROMPT]])
            with torch.no_grad():
                ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                                  do_sample=False)[0, ids.shape[1]:].tolist()  # fmt: skip
        except Exception as e:  # noqa: BLE001
            # the tiny config does not suit its class (a validator, a derived size): not counted
            return {**row, "built": False, "reason": f"transformers itself fails: {type(e).__name__}: {str(e)[:160]}"}
        row["reference"] = ref
        import jax

        from bridge.generate import Generator
        from bridge.models import open_model

        for n, scheme, key in [(1, "replicated", "one_device")] + ([(2, "tp", "tp2")] if tp else []):
            try:
                lifted = open_model(d, devices=jax.devices()[:n], scheme=scheme, implementation="transformers",
                                    with_tokenizer=False)  # fmt: skip
                if lifted.model.recompute_reason:
                    row["recomputes"] = lifted.model.recompute_reason
                got = Generator(lifted, stop_at_eos=False).generate_ids([ids[0].tolist()], 8).token_ids[0]
                row[key] = got == ref
                if got != ref:
                    row.setdefault("reason", f"{key}: tokens differ: {got} vs {ref}")
            except Exception as e:  # noqa: BLE001
                row[key] = False
                row.setdefault("reason", f"{key}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            if not row[key]:
                break
    return row


# Why a type that builds is not equal, as read from its code (the row's reason says what happened).
CAUSES = {
    "cpmant": "its mask counts the nonzero ids and takes them for the last columns (it expects left padding with id 0): "
              "its decode step reads the cache length as a number, and the recomputed history, whose unwritten columns "
              "trail the tokens, is read as padding at the wrong end",
    "xlm": "it reads `lengths.max().item()` of its input ids, data that a traced program does not have, with a cache "
           "or without one",
    "jetmoe": "its experts size their batches with `.tolist()` of the routing counts (data-dependent shapes), which "
              "a fake-tensor probe and a trace cannot answer",
    "moshi": "transformers' cached `generate` differs from transformers' own uncached greedy forward (sliding window "
             "5), whose tokens [18, 393, 96, 39, 393, 152, 211, 126] are exactly ours",
}  # fmt: skip


def write_tables(results: list[dict], summary: dict) -> None:
    """``benchmarks/results/decoder_sweep.{json,md}``, each whole or not at all."""
    import transformers

    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)

    def write(name: str, text: str) -> None:
        tmp = out / f"{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)

    write("decoder_sweep.json", json.dumps({"transformers": transformers.__version__, "summary": summary, "rows": results},
                                           indent=1))  # fmt: skip
    lines = [f"Decoder-only types of transformers {transformers.__version__}'s causal-LM mapping, tiny random models, 8 greedy "
             f"tokens against transformers' own `generate` (`benchmarks/decoder_sweep.py`). Summary: {json.dumps(summary)}", "",
             "| type | 1 device | tp 2 | reason |", "| --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        why = r.get("reason") or (f"decodes by recomputing: {r['recomputes']}" if r.get("recomputes") else "")
        if r.get("built") and not r.get("one_device") and r["type"] in CAUSES:
            why += f". Cause: {CAUSES[r['type']]}"
        lines.append(f"| {r['type']} | {'equal' if r.get('one_device') else '-'} | {'equal' if r.get('tp2') else '-'} | "
                     f"{why.replace('|', '/')} |")  # fmt: skip
    write("decoder_sweep.md", "\n".join(lines) + "\n")


def cpu_name() -> str:
    """The CPU model and widest vector ISA, for the table's note."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    isa = "avx512f" if " avx512f" in info else "avx2" if " avx2" in info else "no avx2"
    return f"{model}, {isa}"


def decoder_only_types() -> list[str]:
    import transformers as T
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        try:
            if getattr(T.AutoConfig.for_model(t), "is_encoder_decoder", False):
                continue
        except Exception:  # noqa: BLE001 - a type whose config cannot even be made stays in the list
            pass
        out.append(t)
    return sorted(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=240)
    ap.add_argument("--types", help="comma-separated model types (default: every decoder-only one)")
    ap.add_argument("--no-tp", action="store_true")
    ap.add_argument("--merge", action="store_true",
                    help="with --types: replace those rows of the committed table and write it again")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one type, its row as JSON
    args = ap.parse_args()
    if args.one:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
        sys.path.insert(0, str(ROOT))
        import warnings

        warnings.simplefilter("ignore")
        print("ROW " + json.dumps(run_one(args.one, not args.no_tp)), flush=True)
        return 0
    types = args.types.split(",") if args.types else decoder_only_types()

    def child(t: str) -> dict:
        cmd = [sys.executable, __file__, "--one", t] + (["--no-tp"] if args.no_tp else [])
        t0 = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"type": t, "reason": f"timed out after {args.timeout} s", "seconds": args.timeout}
        rows = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if not rows:
            tail = (done.stderr.strip().splitlines() or ["?"])[-1][:200]
            return {"type": t, "reason": f"the process died (exit {done.returncode}): {tail}"}
        return {**json.loads(rows[-1]), "seconds": round(time.perf_counter() - t0, 1)}

    results = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(child, types):
            results.append(row)
            mark = "=" if row.get("one_device") else "x"
            print(f"{mark} {row['type']:<28} {row.get('reason', 'equal' + (', tp2 equal' if row.get('tp2') else ''))}"[:200],
                  flush=True)  # fmt: skip
    rerun = {r["type"] for r in results}
    if args.merge:  # the committed table with these rows run again (the others as they were)
        previous = json.loads((ROOT / "benchmarks" / "results" / "decoder_sweep.json").read_text())
        results = sorted([r for r in previous["rows"] if r["type"] not in rerun] + results, key=lambda r: r["type"])
    built = [r for r in results if r.get("built")]
    equal = [r for r in built if r.get("one_device")]
    tp_equal = [r for r in equal if r.get("tp2")]
    summary = {"types": len(results), "built": len(built), "equal_one_device": len(equal),
               "equal_tp2": len(tp_equal), "fraction_equal_of_built": len(equal) / max(1, len(built)),
               "machine": cpu_name()}  # fmt: skip
    if args.merge:
        earlier = previous["summary"].get("note")
        summary["note"] = (f"{earlier}; " if earlier else "") + (f"{len(rerun)} rows run again on {time.strftime('%Y-%m-%d')} "
                                                                 f"({cpu_name()}): {', '.join(sorted(rerun))}")  # fmt: skip
    if not args.types or args.merge:
        write_tables(results, summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
