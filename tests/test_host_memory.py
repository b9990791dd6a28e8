"""Weights on 2 MiB pages (``bridge.host_memory``): the pages change, the contents do not."""

import errno

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridge import host_memory


def huge_bytes_at(address: int) -> int:
    """AnonHugePages (bytes) of the mapping in /proc/self/smaps that holds ``address``."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


# THP never, or not Linux: test_thp_never_leaves_weights_alone_and_generation_works covers that machine
needs_thp = pytest.mark.skipif(host_memory.why_unavailable() is not None, reason=str(host_memory.why_unavailable()))


@needs_thp
def test_collapses_a_weight_into_huge_pages_and_keeps_its_values(monkeypatch):
    monkeypatch.delenv(host_memory.SWITCH, raising=False)
    values = np.random.default_rng(0).standard_normal((4096, 1024)).astype(np.float32)  # 16 MiB
    weight = jax.device_put(values, jax.devices("cpu")[0])
    address = weight.unsafe_buffer_pointer()
    product = jax.jit(lambda w: w @ jnp.ones(1024))
    before = np.asarray(product(weight))
    refusals = []
    done = host_memory.back_with_huge_pages({"w": weight, "small": jnp.ones(3)}, refusals=refusals)
    assert_collapsed_or_refused_for_memory(done, 7, refusals)  # every whole 2 MiB page inside the 16 MiB buffer
    assert huge_bytes_at(address + host_memory.HUGE_PAGE) >= done
    np.testing.assert_array_equal(np.asarray(weight), values)
    np.testing.assert_array_equal(np.asarray(product(weight)), before)  # the same program reads the same


def test_switched_off_or_small_does_nothing(monkeypatch):
    monkeypatch.setenv(host_memory.SWITCH, "0")
    assert host_memory.why_unavailable() == f"{host_memory.SWITCH}=0"
    assert host_memory.back_with_huge_pages([jnp.ones((4096, 1024))]) is None
    monkeypatch.setenv(host_memory.SWITCH, "1")
    assert host_memory.back_with_huge_pages([jnp.ones((16, 16))]) == 0  # no whole 2 MiB page inside


def assert_collapsed_or_refused_for_memory(done: int, pages: int, refusals: list) -> None:
    """All ``pages`` collapsed, or the kernel refused the collapse itself, which is a best effort
    (EAGAIN/ENOMEM: no free 2 MiB pages at that moment; EINVAL: the process's mappings changed under
    it, seen 1 run in 7 on a busy machine); marking a range MADV_HUGEPAGE must never fail (it does
    for a misaligned or foreign range)."""
    assert not [r for r in refusals if r[0] != "MADV_COLLAPSE"], refusals
    assert {e for _, e in refusals} <= {errno.EAGAIN, errno.ENOMEM, errno.EINVAL}, refusals
    assert done >= pages * host_memory.HUGE_PAGE or refusals, (done, refusals)


@needs_thp
@pytest.mark.parametrize("background", [False, True])
def test_sharded_weights_on_eight_devices(devices, background, monkeypatch):
    """Each device's shard is its own host buffer; the background thread holds the arrays until done."""
    monkeypatch.delenv(host_memory.SWITCH, raising=False)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(devices[:8]), ("x",))
    values = np.arange(8 * 1024 * 1024, dtype=np.float32).reshape(8 * 1024, 1024)  # 4 MiB per device
    weight = jax.device_put(values, NamedSharding(mesh, P("x")))
    refusals = []
    out = host_memory.back_with_huge_pages([weight], background=background, refusals=refusals)
    if background:
        out.join()
        out = sum(huge_bytes_at(s.data.unsafe_buffer_pointer() + host_memory.HUGE_PAGE) > 0
                  for s in weight.addressable_shards) * host_memory.HUGE_PAGE  # fmt: skip
    assert_collapsed_or_refused_for_memory(out, 8, refusals)  # at least one whole page per shard
    np.testing.assert_array_equal(np.asarray(weight), values)


def test_generator_collapses_its_weights_once_after_its_first_request(devices, monkeypatch):
    """Not beside the first compile (collapsing holds the memory map: a cached compile went from
    0.26 to 1.9-2.6 s), and once: later requests run on the pages already moved."""
    import model_torch
    import sharding
    from bridge.generate import Generator
    from bridge.lift import lift

    calls = []
    monkeypatch.setattr(host_memory, "back_with_huge_pages", lambda arrays, background=False, refusals=None: calls.append(
        (set(arrays), background)) or 0)  # fmt: skip
    lifted = lift(model_torch.from_preset("tiny-llama").eval(), sharding.mesh_for("tp", 1, devices=devices), "tp")
    gen = Generator(lifted, eos_token_ids=[])
    (hook,) = gen.after_request  # the default: generation itself does not touch host memory
    assert calls == [] and hook.state is None
    gen.generate_ids([[3, 4, 5]], 4)
    gen.generate_ids([[3, 4, 5, 6]], 4)
    assert calls == [(set(lifted.weights), True)] and hook.state is False  # nothing to move: tiny
    assert Generator(lifted, after_request=()).after_request == []  # a caller can opt out


def test_thp_never_leaves_weights_alone_and_generation_works(devices, monkeypatch, tmp_path):
    """A machine with THP switched off: nothing is collapsed, the reason is stated, and a Generator
    still generates (its huge-pages hook ends as False: nothing done)."""
    import model_torch
    import sharding
    from bridge.generate import Generator
    from bridge.lift import lift

    mode = tmp_path / "enabled"
    mode.write_text("always madvise [never]\n")
    monkeypatch.setattr(host_memory, "THP_MODE", mode)
    monkeypatch.delenv(host_memory.SWITCH, raising=False)
    assert host_memory.why_unavailable() == "transparent huge pages are switched off on this machine ([never])"
    assert host_memory.back_with_huge_pages([jnp.ones((4096, 1024))]) is None
    lifted = lift(model_torch.from_preset("tiny-llama").eval(), sharding.mesh_for("tp", 1, devices=devices), "tp")
    gen = Generator(lifted, eos_token_ids=[])
    assert len(gen.generate_ids([[3, 4, 5]], 4).token_ids[0]) == 4
    assert gen.after_request[0].state is False
