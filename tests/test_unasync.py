"""The SDK's sync client is generated from its async one (scripts/unasync.py), and so
are the sync network wrappers of ``_headwait.py`` and ``_decoding.decoded`` (in place,
between markers): the committed code must be exactly what the script writes now, and
each pair must keep one API. Fast, no server, no torch."""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

import jacobian_client as jc
from jacobian_client import _decoding, _headwait

ROOT = Path(__file__).resolve().parent.parent


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unasync_script", ROOT / "scripts" / "unasync.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


unasync = _script()


def test_the_committed_sync_code_is_what_the_script_writes() -> None:
    assert [path.name for path in unasync.generated()] == ["_sync.py", "_headwait.py", "_decoding.py"]
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


@pytest.mark.parametrize("name, old, new", [
    ("_headwait.py", "        _sent(0, True)\n", "        _sent(0, False)\n"),   # the sync stream's write
    ("_decoding.py", "    for piece in decoder.flush():\n", "    for piece in ():\n"),
])
def test_check_fails_with_a_diff_when_a_generated_region_was_edited_by_hand(
        name: str, old: str, new: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    (path,) = [path for path in unasync.IN_PLACE if path.name == name]
    text = path.read_text(encoding="utf-8")
    generated = text.index(unasync.SYNC_MARK)
    assert text[generated:].count(old) == 1
    edited = tmp_path / path.name
    # edited below the marker only: its async source is unchanged
    edited.write_text(text[:generated] + text[generated:].replace(old, new), encoding="utf-8")
    monkeypatch.setattr(unasync, "IN_PLACE", [edited])
    assert unasync.main(["--check"]) == 1
    assert f"-{new}+{old}" in capsys.readouterr().out
    assert unasync.main([]) == 0                                    # and writing it mends it
    assert edited.read_text(encoding="utf-8") == text


@pytest.mark.parametrize("mark", ["ASYNC_MARK", "SYNC_MARK", "END_MARK"])
def test_a_region_with_a_marker_lost_or_repeated_fails_loudly(mark: str) -> None:
    # one lost would have the rewrite swallow the rest of the module, or write nothing
    text = unasync.IN_PLACE[-1].read_text(encoding="utf-8")
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


@pytest.mark.parametrize("name, defines", [
    ("_headwait.py", ["class _Stream(httpcore.NetworkStream):", "class _Backend(httpcore.NetworkBackend):"]),
    ("_decoding.py", ["def decoded(response: httpx.Response) -> Iterator[bytes]:"]),
])
def test_the_generated_regions_keep_nothing_async(name: str, defines: list[str]) -> None:
    (path,) = [path for path in unasync.IN_PLACE if path.name == name]
    region = path.read_text(encoding="utf-8").split(unasync.SYNC_MARK)[1].split(unasync.END_MARK)[0]
    assert [line for line in defines if line in region] == defines
    for word in ("async", "await", "aclose", "aclosing", "Async", "_AsyncStream", "_AsyncBackend",
                 "AsyncNetworkStream", "AsyncIterator", "aiter_raw", "adecoded"):
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


def test_decoded_and_adecoded_give_one_body() -> None:
    # the generated decoder against its source, on a body of two gzip members (each a
    # layer of its own) read in pieces: the same pieces, in the same order
    import asyncio
    import gzip

    import httpx

    body = gzip.compress(b"a" * 200_000) + gzip.compress(bytes(range(256)) * 300)
    raw = [body[i:i + 4096] for i in range(0, len(body), 4096)]

    class Sync(httpx.SyncByteStream):
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield from raw

    class Async(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            for piece in raw:
                yield piece

    headers = {"content-encoding": "gzip"}
    sync = list(_decoding.decoded(httpx.Response(200, headers=headers, stream=Sync())))

    async def collect() -> list[bytes]:
        return [piece async for piece in _decoding.adecoded(httpx.Response(200, headers=headers, stream=Async()))]

    assert sync == asyncio.run(collect())
    assert b"".join(sync) == b"a" * 200_000 + bytes(range(256)) * 300
    assert max(map(len, sync)) <= _decoding.PIECE and len(sync) > 3
