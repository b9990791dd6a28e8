"""The torchax shim: torchax imports and runs on torch 2.13; the shim touches nothing that exists."""

import pytest
import torch

from bridge import torchax_compat
from bridge.torchax_compat import RemovedOverload, import_torchax, named_tensor_placeholders


def test_torchax_imports_and_runs_an_op():
    tx = import_torchax()
    a = torch.arange(6.0).reshape(2, 3)
    with tx.default_env():
        x = a.to("jax")
        y = (x @ x.T).sum()
        assert type(y).__module__.startswith("torchax")
        got = float(y.cpu())
    assert got == float((a @ a.T).sum())


def test_placeholders_answer_only_the_removed_named_tensor_overloads():
    import_torchax()
    names = torchax_compat.PLACEHOLDERS
    removed = []
    for name in names:
        op, _, overload = name.removeprefix("aten::").partition(".")
        try:
            getattr(getattr(torch.ops.aten, op), overload)
        except AttributeError:
            removed.append(name)
    # Every answered name is really missing from this torch, and all are named-tensor overloads.
    assert removed == names
    assert all(torchax_compat.NAMED_TENSOR_OVERLOAD.search(n.split(".")[-1]) for n in names)
    if not hasattr(torch.ops.aten.prod, "dim_Dimname"):
        assert "aten::prod.dim_Dimname" in names


def test_patch_is_scoped_and_not_cached():
    with named_tensor_placeholders() as answered:
        ph = torch.ops.aten.prod.dim_Dimname if not hasattr(torch.ops.aten.prod, "dim_Dimname") else None
        with pytest.raises(AttributeError):  # not a named-tensor name: still an error
            torch.ops.aten.prod.no_such_overload
    if ph is not None:
        assert isinstance(ph, RemovedOverload) and answered == ["aten::prod.dim_Dimname"]
        with pytest.raises(RuntimeError):
            ph(torch.ones(2))  # inert: never dispatches to anything real
        with pytest.raises(AttributeError):  # gone after the context
            torch.ops.aten.prod.dim_Dimname


def test_existing_overload_is_returned_untouched():
    # A torch that still has a named-tensor overload: define one, and check the shim hands back the
    # real OpOverload (identical object), not a placeholder.
    lib = torch.library.Library("bridge_compat_test", "DEF")
    lib.define("f.Dimname(Tensor x) -> Tensor")
    lib.impl("f.Dimname", lambda x: x + 1, "CompositeExplicitAutograd")
    real = torch.ops.bridge_compat_test.f.Dimname
    with named_tensor_placeholders() as answered:
        inside = torch.ops.bridge_compat_test.f.Dimname
    assert inside is real and isinstance(inside, torch._ops.OpOverload) and answered == []
    assert torch.equal(inside(torch.zeros(2)), torch.ones(2))
    # Real overloads torchax uses are untouched too.
    with named_tensor_placeholders():
        assert torch.ops.aten.add.Tensor is torch.ops.aten.add.Tensor
        assert isinstance(torch.ops.aten.index_add.default, torch._ops.OpOverload)
