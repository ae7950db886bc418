"""Round 51 of the hostile clients: an operator's action wants an operator's key, and the
sparsity patterns clients have detected hold a bounded part of the disk.

``DELETE /v1/functions/{name}/quarantine`` lets a function that crashed or hung its engine
``QUARANTINE_AFTER`` times run again. Any caller let in with an API key could take it:
crash the engine with its function (a 500 to itself), be quarantined, release, crash it
again, for ever, each crash costing every other client's request in flight on that engine
a retry (503), each hang an engine killed. Measured before the fix, on ``serve`` with
``API_KEYS=user`` and ``QUARANTINE_AFTER=1``: ``DELETE`` with the user's key was a 200
``{"released": true}`` and the function's next call crashed the engine again. Now the
route is marked ``auth="admin"`` in the one table: it takes only an operator's key
(``ADMIN_KEYS`` / ``ADMIN_KEYS_FILE``, also an API key elsewhere); with API keys and no
operators' keys, no key may take it (the cooldown still lifts a quarantine).

With ``SPARSITY_CACHE_DIR`` set, every pattern detected went to disk with no bound, and
clients choose the shapes: measured, ``GET /v1/functions/sin/sparsity?shapes=1000000``,
then ``1001000``, ... wrote 24 MB a request, 567 MB in 10 s from one API key (40 MB/s),
until the disk was full. Now the directory holds at most about
``SPARSITY_CACHE_MAX_BYTES``, the least recently used entries going first.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

from jacobian_service.settings import Settings, SettingsError
from jacobian_service.sparsity import PatternCache

from ._fault_support import ARMED
from .conftest import assert_problem, live_server

USER = {"authorization": "Bearer user-key-51"}
OPERATOR = {"authorization": "Bearer operator-key-51"}
RELEASE = "/v1/functions/sin/quarantine"


# ------------------------------------------------------------------ in process: who may


def _released(r: httpx.Response) -> None:
    assert r.status_code == 200 and r.json() == {"function": "sin", "released": False}, r.text


def test_with_operators_keys_only_an_operator_releases(make_client) -> None:
    c = make_client(api_keys="user-key-51", admin_keys="operator-key-51")
    problem = assert_problem(c.delete(RELEASE, headers=USER), 403, "forbidden")
    assert "ADMIN_KEYS" in problem["detail"] and "QUARANTINE_COOLDOWN_S" in problem["detail"], problem
    # A key that is none gets the same words as a user's key: nothing told apart.
    assert assert_problem(c.delete(RELEASE, headers={"authorization": "Bearer nope"}), 403,
                          "forbidden")["detail"] == problem["detail"]
    r = c.delete(RELEASE)
    assert_problem(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer" and "ADMIN_KEYS" in r.json()["detail"]
    _released(c.delete(RELEASE, headers=OPERATOR))
    # The operator's key is an API key too; the user's still is.
    for headers in (USER, OPERATOR):
        assert c.get("/v1/functions/sin", headers=headers).status_code == 200
    assert_problem(c.get("/v1/functions/sin"), 401, "unauthorized")
    # The same table: an unknown function, past the operator's key, is the route's 404;
    # an encoded slash is no route at all (and the user's key opens no release by it).
    assert_problem(c.delete("/v1/functions/nope/quarantine", headers=OPERATOR), 404, "function_not_found")
    assert_problem(c.delete("/v1/functions/sin%2Fquarantine", headers=USER), 404, "not_found")


def test_with_api_keys_and_no_operators_keys_no_key_releases(make_client) -> None:
    c = make_client(api_keys="user-key-51")
    for headers in (USER, OPERATOR):
        problem = assert_problem(c.delete(RELEASE, headers=headers), 403, "forbidden")
        assert "no operators' keys (ADMIN_KEYS)" in problem["detail"], problem
    assert_problem(c.delete(RELEASE), 401, "unauthorized")  # (as every guarded route: the document says 401 / 403)
    assert c.get("/v1/functions/sin", headers=USER).status_code == 200


def test_operators_keys_alone_guard_only_the_operators_action(make_client) -> None:
    c = make_client(admin_keys="operator-key-51")
    assert c.get("/v1/functions/sin").status_code == 200  # the API stays open
    assert c.post("/v1/functions/sin/evaluate", json={"inputs": [[0.5]]}).status_code == 200
    assert_problem(c.delete(RELEASE), 401, "unauthorized")
    assert_problem(c.delete(RELEASE, headers=USER), 403, "forbidden")
    _released(c.delete(RELEASE, headers=OPERATOR))


def test_without_keys_auth_stays_off(make_client) -> None:
    _released(make_client().delete(RELEASE))


def test_the_openapi_document_says_who_may(make_client) -> None:
    def op(c) -> dict:
        return c.get("/openapi.json", headers=OPERATOR).json()["paths"]["/v1/functions/{name}/quarantine"]["delete"]

    guarded = op(make_client(api_keys="user-key-51", admin_keys="operator-key-51"))
    assert guarded["security"] == [{"bearer": []}] and {"401", "403"} <= set(guarded["responses"])
    assert "ADMIN_KEYS" in guarded["description"]
    alone = op(make_client(api_keys="", admin_keys="operator-key-51"))
    assert alone["security"] == [{"bearer": []}] and "403" in alone["responses"]
    assert "security" not in op(make_client(api_keys="", admin_keys=""))  # (make_client keeps what it set)


def test_an_operators_keys_file_that_holds_none_stops_start_up(tmp_path) -> None:
    empty = tmp_path / "admin-keys"
    empty.write_text("# nobody\n\n")
    with pytest.raises(SettingsError, match="ADMIN_KEYS_FILE .* holds no keys"):
        Settings(admin_keys_file=empty).load_admin_keys()
    empty.write_text("# the operator\nop-1\n")
    assert Settings(admin_keys="op-2", admin_keys_file=empty).load_admin_keys() == ("op-2", "op-1")


# ------------------------------------------------------------------ the patterns' disk cache


def _entry(n: int) -> dict:
    from jacobian_service.sparsity.patterns import Pattern

    idx = np.arange(n)
    return {"pattern": Pattern((n, n), idx, idx), "colors": np.zeros(n, np.int64), "mode": "rev"}


def _disk(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.npz"))


def test_the_disk_cache_keeps_to_its_bound_the_least_recently_used_going(tmp_path) -> None:
    one = len(_npz_of(tmp_path, _entry(1000)))
    cache = PatternCache(tmp_path / "c", max_disk_bytes=5 * one)
    (tmp_path / "c").mkdir()
    stale = tmp_path / "c" / "left.tmp"  # from a process killed mid-write
    stale.write_bytes(b"x" * 100)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    for i in range(4):
        cache.put(f"k{i}", _entry(1000))
        os.utime(tmp_path / "c" / f"k{i}.npz", (i, i))  # written in this order, long ago
    assert not stale.exists()
    assert PatternCache(tmp_path / "c").get("k0") is not None  # read: used now, kept past k1, k2, k3
    for i in range(4, 12):
        cache.put(f"k{i}", _entry(1000))
        assert _disk(tmp_path / "c") <= 5 * one, i
    kept = {p.stem for p in (tmp_path / "c").glob("*.npz")}
    assert "k11" in kept and not kept & {"k1", "k2", "k3"}, kept
    # An entry larger than the whole bound stays in memory only.
    cache.put("big", _entry(50_000))
    assert not (tmp_path / "c" / "big.npz").exists() and cache.get("big") is not None


def _npz_of(tmp_path: Path, entry: dict) -> bytes:
    PatternCache(tmp_path / "size").put("one", entry)
    return (tmp_path / "size" / "one.npz").read_bytes()


# ------------------------------------------------------------------ serve: a crashing function

CACHE_BOUND = 2 << 20  # sin's pattern at n = 20,000: about 0.5 MB on disk


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as cache, \
            live_server(FUNCTIONS="jacobian_service.examples,tests.fault_functions", WORKERS=1, WARMUP="false",
                        QUARANTINE_AFTER=1, API_KEYS="user-key-51", ADMIN_KEYS="operator-key-51", DEVICE="cpu",
                        SPARSITY_CACHE_DIR=cache, SPARSITY_CACHE_MAX_BYTES=CACHE_BOUND) as served:
        served[1].cache_dir = Path(cache)  # type: ignore[attr-defined]
        yield served


def test_clients_shapes_fill_no_more_than_the_bound_of_disk(server) -> None:
    url, proc = server
    with httpx.Client(timeout=60, headers=USER) as c:
        for n in range(20_000, 30_000, 1_000):  # ~5 MB of patterns in all
            r = c.get(f"{url}/v1/functions/sin/sparsity", params={"shapes": str(n), "format": "coo"})
            assert r.status_code == 200 and r.json()["pattern"]["nnz"] == n, r.text[:300]
            assert 0 < _disk(proc.cache_dir) <= CACHE_BOUND, n


def test_a_user_cannot_release_the_function_that_crashed_its_engine(server) -> None:
    url, _ = server
    with httpx.Client(timeout=30) as c:
        assert_problem(c.post(f"{url}/v1/functions/exits/evaluate", json=ARMED, headers=USER), 500, "function_error")
        deadline = time.monotonic() + 10
        while (r := c.post(f"{url}/v1/functions/exits/evaluate", json={"inputs": [[0.5]]}, headers=USER)).status_code != 503:
            assert time.monotonic() < deadline, r.text  # (the supervisor's word reaches the front end)
            time.sleep(0.1)
        assert_problem(r, 503, "function_quarantined")
        assert_problem(c.delete(f"{url}/v1/functions/exits/quarantine", headers=USER), 403, "forbidden")
        time.sleep(0.6)  # a release would have reached the front end (states every 0.5 s)
        assert_problem(c.post(f"{url}/v1/functions/exits/evaluate", json={"inputs": [[0.5]]}, headers=USER),
                       503, "function_quarantined")
        # No engine holds the operators' key: a function could read it there.
        for pid in c.get(f"{url}/v1/info", headers=USER).json()["engine_pids"]:
            with open(f"/proc/{pid}/environ", "rb") as fp:
                environ = fp.read()
            assert b"operator-key-51" not in environ and b"ADMIN_KEYS" not in environ
        r = c.delete(f"{url}/v1/functions/exits/quarantine", headers=OPERATOR)
        assert r.status_code == 200 and r.json() == {"function": "exits", "released": True}, r.text
        deadline = time.monotonic() + 10
        while (r := c.post(f"{url}/v1/functions/exits/evaluate", json={"inputs": [[0.5]]}, headers=USER)).status_code != 200:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.1)


def test_request_ids_say_nothing_of_other_clients_traffic(server) -> None:
    """An answer's own X-Request-ID was a prefix per front end and a counter: two answers
    told a client how many requests the front end had served between them (here, with
    one front end: exactly 1 apart, back to back). Now ids are a keyed hash of the count."""
    url, _ = server
    with httpx.Client(timeout=10) as c:
        ids = [c.get(f"{url}/healthz").headers["x-request-id"] for _ in range(4)]
    assert len(set(ids)) == 4 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids), ids
    assert len({i[:16] for i in ids}) == 4, ids  # no prefix per process to group them by
    steps = [int(b[16:], 16) - int(a[16:], 16) for a, b in zip(ids, ids[1:])]
    assert not all(0 < s < 1000 for s in steps), (ids, steps)
