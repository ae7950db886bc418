"""The SDK's sync client is generated from its async one (scripts/unasync.py), and so
are the sync network wrappers of ``_headwait.py`` (in place, between markers): the
committed code must be exactly what the script writes now, and each pair must keep one
API. Fast, no server, no torch."""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

import jacobian_client as jc
from jacobian_client import _headwait

ROOT = Path(__file__).resolve().parent.parent


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unasync_script", ROOT / "scripts" / "unasync.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


unasync = _script()


def test_the_committed_sync_code_is_what_the_script_writes() -> None:
    assert [path.name for path in unasync.generated()] == ["_sync.py", "_headwait.py"]
    diff = unasync.stale()
    assert diff == "", f"generated code is stale: run `make unasync`\n{diff}"
    assert unasync.main(["--check"]) == 0


def test_check_fails_with_a_diff_when_the_sync_client_was_edited_by_hand(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    edited = tmp_path / "_sync.py"
    text = unasync.TARGET.read_text(encoding="utf-8")
    edited.write_text(text.replace("time.sleep(delay)", "time.sleep(delay * 2)"), encoding="utf-8")
    monkeypatch.setattr(unasync, "TARGET", edited)
    assert unasync.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "-            time.sleep(delay * 2)\n+            time.sleep(delay)\n" in out


def test_check_fails_with_a_diff_when_a_generated_region_was_edited_by_hand(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (path,) = unasync.IN_PLACE
    text = path.read_text(encoding="utf-8")
    generated = text.index(unasync.SYNC_MARK)
    edited = tmp_path / path.name
    # the sync stream's write, edited below the marker only: its async source is unchanged
    edited.write_text(text[:generated] + text[generated:].replace("_sent(0, True)", "_sent(0, False)", 1),
                      encoding="utf-8")
    monkeypatch.setattr(unasync, "IN_PLACE", [edited])
    assert unasync.main(["--check"]) == 1
    assert "-        _sent(0, False)\n+        _sent(0, True)\n" in capsys.readouterr().out
    assert unasync.main([]) == 0                                    # and writing it mends it
    assert edited.read_text(encoding="utf-8") == text


@pytest.mark.parametrize("mark", ["ASYNC_MARK", "SYNC_MARK", "END_MARK"])
def test_a_region_with_a_marker_lost_or_repeated_fails_loudly(mark: str) -> None:
    # one lost would have the rewrite swallow the rest of the module, or write nothing
    text = unasync.IN_PLACE[0].read_text(encoding="utf-8")
    marker = getattr(unasync, mark)
    for broken in (text.replace(marker, ""), text.replace(marker, marker + marker)):
        with pytest.raises(ValueError, match="must hold each marker once"):
            unasync.in_place(broken)


def test_a_documentation_rule_that_no_longer_matches_fails_loudly() -> None:
    # a sentence edited in _async.py without its rule would otherwise carry "coroutine"
    # into Client's docstring
    source = unasync.SOURCE.read_text(encoding="utf-8")
    old = unasync.PHRASES[-1][0]
    with pytest.raises(ValueError, match="expected this phrase once"):
        unasync.unasync(source.replace(old, old.replace("coroutine function", "coroutine")))


def test_the_generated_client_says_it_is_generated_and_keeps_nothing_async() -> None:
    text = unasync.TARGET.read_text(encoding="utf-8")
    assert text.splitlines()[0].startswith("# Generated from _async.py by scripts/unasync.py")
    code = re.sub(r'"""(?s:.*?)"""', '""', text)  # the docstrings may say "async client"
    for word in ("async", "await", "anyio", "aclose", "AsyncClient", "Awaitable", "asyncio", "PerLoop", "adecoded"):
        assert re.search(rf"\b{word}\b", code) is None, word
    assert "coroutine" not in text and "asyncio" not in text


def test_the_generated_region_keeps_nothing_async() -> None:
    text = unasync.IN_PLACE[0].read_text(encoding="utf-8")
    region = text.split(unasync.SYNC_MARK)[1].split(unasync.END_MARK)[0]
    assert "class _Stream(httpcore.NetworkStream):" in region and "class _Backend(httpcore.NetworkBackend):" in region
    for word in ("async", "await", "aclose", "Async", "_AsyncStream", "_AsyncBackend", "AsyncNetworkStream"):
        assert re.search(rf"\b{word}\b", region) is None, word


def _api(cls: type, private: bool = False) -> dict[str, tuple[str, str | None, bool]]:
    renamed = {"aclose": "close", "__aenter__": "__enter__", "__aexit__": "__exit__"}
    api = {}
    for name, member in vars(cls).items():
        if name.startswith("__" if private else "_") and name not in (
                "__init__", "__reduce__", *renamed, *renamed.values()):
            continue
        if isinstance(member, property):
            api[name] = ("property", member.fget.__doc__, False)
            continue
        signature = str(inspect.signature(member)).replace("AsyncBaseTransport", "BaseTransport")
        signature = signature.replace("AsyncClient", "Client").replace("Awaitable[Any]", "Any")
        signature = signature.replace("AsyncNetwork", "Network")
        api[renamed.get(name, name)] = (signature, member.__doc__, inspect.iscoroutinefunction(member))
    return api


def test_client_and_async_client_have_one_api() -> None:
    sync, coro = _api(jc.Client), _api(jc.AsyncClient)
    assert sorted(sync) == sorted(coro)
    for name in sync:
        assert sync[name][0] == coro[name][0], name                  # the same signature
        assert sync[name][2] is False                               # nothing to await in Client
        assert coro[name][2] is (name not in ("__init__", "__reduce__", "jacrev", "base_url")), name
        if name not in ("jacrev",):                                 # its words differ on purpose
            assert sync[name][1] == coro[name][1], name


@pytest.mark.parametrize("sync, coro", [(_headwait._Stream, _headwait._AsyncStream),
                                        (_headwait._Backend, _headwait._AsyncBackend)])
def test_the_network_wrappers_have_one_api(sync: type, coro: type) -> None:
    # what httpcore calls on a stream or backend: the same methods, async in the async one
    # (get_extra_info is sync in both, as httpcore's own)
    assert [base.__name__ for base in sync.__bases__] == [base.__name__.replace("Async", "") for base in coro.__bases__]
    ours, theirs = _api(sync, private=True), _api(coro, private=True)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert ours[name][0] == theirs[name][0], name
        assert ours[name][2] is False, name
        assert theirs[name][2] is (name not in ("__init__", "get_extra_info")), name
