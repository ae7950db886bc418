"""Round 10 of the engine's per-request CPU (issue 9's latency and throughput): checks the
engine makes after every batch, made cheaper without seeing less.

- ``torch_kernels._Kernels.count``: the sizes of the two sets a kernel is noted in, not the
  size of their union (a set of ~1,900 names built at every batch, ~12 us); a kernel over
  a torch operator registered from outside torch is still found, by either way in, after
  a removal too.
"""

from __future__ import annotations

import torch
import torch.library

from jacobian_service.engine import torch_kernels


def _kernels(monkeypatch, impls: set[str], direct: set[str]) -> tuple[torch_kernels._Kernels, list[set[str]]]:
    """A fresh ``_Kernels`` over stand-in sets, its look for foreign kernels recorded: a
    key holding "foreign" is one registered from outside torch."""
    monkeypatch.setattr(torch.library, "_impls", impls)
    monkeypatch.setattr(torch_kernels, "_DIRECT", direct)
    looked: list[set[str]] = []

    def foreign(keys: set[str]) -> set[str]:
        looked.append(set(keys))
        return {k for k in keys if "foreign" in k}

    monkeypatch.setattr(torch_kernels, "_foreign", foreign)
    kernels = torch_kernels._Kernels()
    kernels.take()
    return kernels, looked


def _changed(kernels: torch_kernels._Kernels) -> bool:
    return kernels.changed(kernels.count(), None)  # as a settings pass tests it


def test_count_builds_no_union(monkeypatch) -> None:
    impls, direct = {"aten/sin/CPU", "aten/cos/CPU"}, {"aten/sin/CPU", "aten/tan/CPU"}
    kernels, looked = _kernels(monkeypatch, impls, direct)

    def union() -> set[str]:
        raise AssertionError("the union built at a pass that finds nothing new")

    monkeypatch.setattr(torch_kernels, "_impls", union)
    for _ in range(3):
        assert not _changed(kernels)
    assert looked == []


def test_a_foreign_kernel_is_found_either_way_in(monkeypatch) -> None:
    impls, direct = {"aten/sin/CPU"}, {"aten/sin/CPU"}
    kernels, looked = _kernels(monkeypatch, impls, direct)
    impls.add("aten/cos/CPU")  # torch's own (a batching rule at its first vmap): taken as the engine's
    assert not _changed(kernels)
    assert looked == [{"aten/cos/CPU"}]
    assert not _changed(kernels) and len(looked) == 1  # not looked into again
    direct.add("aten/exp/foreign")  # through torch._C._dispatch_library
    assert _changed(kernels)
    assert kernels.foreign == ["aten/exp/foreign"]
    assert _changed(kernels)  # still there at the next pass (the engine leaves)


def test_found_after_a_removal(monkeypatch) -> None:
    """A kernel taken away (a function's own Library freed) moves the sizes down; one
    registered from outside torch later is found all the same, and one registered through
    ``torch.library`` (noted in both sets) too."""
    impls, direct = {"aten/sin/CPU", "own/twice/CPU"}, {"aten/sin/CPU"}
    kernels, _ = _kernels(monkeypatch, impls, direct)
    impls.discard("own/twice/CPU")
    assert not _changed(kernels)
    impls.add("aten/sin/foreign")
    direct.add("aten/sin/foreign")
    assert _changed(kernels)
    assert kernels.foreign == ["aten/sin/foreign"]


def test_count_in_an_engine_like_process_is_sizes() -> None:
    """The real sets: count is their sizes, no set built."""
    found = torch_kernels.KERNELS.count()
    assert found == (len(getattr(torch.library, "_impls", ())), len(torch_kernels._DIRECT))
