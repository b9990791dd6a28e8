"""The package's structure: no import cycles, model_torch free of JAX, sharding.py free of torch, one
error base class, and the decode step written once."""

import ast
import importlib
import inspect
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("bridge", "model_torch")


def project_modules() -> dict[str, pathlib.Path]:
    files = [ROOT / "sharding.py"] + [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at top level or inside a function."""
    mods = project_modules()
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != m:
                    graph[m].add(name)
    return graph


def test_no_import_cycles():
    graph = import_graph()
    cycles = []

    def walk(node, path):
        for nxt in graph[node]:
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif len(path) < 12:
                walk(nxt, path + [nxt])

    for m in graph:
        walk(m, [m])
    assert not cycles, cycles[:3]


def test_every_module_imports_alone():
    for name in project_modules():
        if not name.endswith("__main__"):  # running it is the CLI
            importlib.import_module(name)


def test_model_torch_has_no_jax_and_sharding_no_torch():
    graph_text = {m: p.read_text() for m, p in project_modules().items()}
    for m, text in graph_text.items():
        if m.startswith("model_torch"):
            assert not re.search(r"^\s*(import|from)\s+(jax|bridge|sharding)\b", text, re.M), m
    assert not re.search(r"^\s*(import|from)\s+torch\b", graph_text["sharding"], re.M)


def test_model_torch_is_plain_torch():
    """``model_torch`` defines models as plain torch: it imports nothing from the bridge, defines no
    custom ops (``torch.library``), and calls none of the bridge's own ops; the bridge recognises standard torch (``F.linear``, ``F.scaled_dot_product_attention``,
    ``index_copy`` for the cache) and swaps modules at load (int8)."""
    bridge_ops = {"int8_linear", "cache_scores", "cache_mix", "ordered_after", "materialized", "layer_slice",
                  "small_batch_matmul", "stack_runner"}  # fmt: skip
    for m, path in project_modules().items():
        if not m.startswith("model_torch"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                assert not [n for n in names if n.split(".")[0] in ("bridge", "sharding", "jax", "torchax")], (m, names)
            if isinstance(node, ast.Attribute) and node.attr == "library":
                raise AssertionError(f"{m} defines a custom op (torch.library): the bridge's job")
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            assert name not in bridge_ops, (m, name, getattr(node, "lineno", None))


def test_user_errors_share_one_base_class():
    from bridge import errors

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == "bridge.errors"]
    assert all(issubclass(c, errors.BridgeError) for c in classes)
    for path in project_modules().values():  # no error class defined anywhere else
        tree = ast.parse(path.read_text())
        defined = [n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name.endswith("Error")]
        assert path.name == "errors.py" or not defined, (path, defined)
    assert errors.ShardingError is importlib.import_module("sharding").ShardingError


def test_decode_step_body_is_written_once():
    """Generation, compare, profile and plan all run programs.decode_step: the model is called with a
    one-token input and a cache in exactly one place."""
    hits = []
    for m, path in project_modules().items():
        text = path.read_text()
        hits += [m for _ in re.finditer(r"\[:, None\],\)", text)]
    assert hits == ["bridge.programs"], hits


def test_families_implement_the_contract():
    import torch

    import model_torch
    from model_torch.contract import CausalLMContract

    for name in ("tiny-llama", "tiny-neox", "tiny-mixtral"):
        with torch.device("meta"):
            model = model_torch.from_preset(name)
        assert isinstance(model, CausalLMContract)
        layers = model.decoder_layers()
        assert len(layers) == model.config.num_layers
        blocks = dict(model.named_blocks())
        assert "layers.0" in blocks and len(blocks) == len(layers) * (1 + len(model.LAYER_BLOCKS))
        cache = model.init_kv_cache(2, 16, device="meta")
        assert cache[0][0].shape[1] == model.kv_cache_heads
        assert model.head_layout()


def test_exported_loader_imports_no_torch():
    """``bridge.exported`` runs exported programs with JAX alone: nothing it imports (transitively,
    within the project) imports torch, torchax or transformers."""
    graph, mods = import_graph(), project_modules()
    seen, todo = set(), ["bridge.exported"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph[m] | ({"bridge"} if m.startswith("bridge.") else set())
    for m in seen:
        text = mods[m].read_text()
        assert not re.search(r"^\s*(import|from)\s+(torch|torchax|transformers)\b", text, re.M), m
    assert seen >= {"bridge.exported", "bridge.prompts"}
