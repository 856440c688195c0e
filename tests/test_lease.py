"""The cross-process lease: semantics in one process, then two real processes contending on
SQLite and on PostgreSQL."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time

import pytest

from jobs.lease import LeaseStore

# Each process: wait for a common start time, then either try to take every key once
# (`keys`), or take one shared key repeatedly and log when it holds it (`mutex`).
WORKER = r"""
import json, sys, time
from jobs.lease import LeaseStore
url, mode, start, n = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
store = LeaseStore(url, ttl_s=60)
while time.time() < start:
    time.sleep(0.001)
out = []
if mode == "keys":
    out = [k for k in (f"model/{i}" for i in range(n)) if store.try_acquire(k)]
else:
    got = 0
    while got < n:
        if store.try_acquire("shared"):
            t0 = time.time(); time.sleep(0.01); t1 = time.time()
            store.release("shared")
            out.append([t0, t1]); got += 1
        else:
            time.sleep(0.002)
print(json.dumps({"holder": store.holder, "out": out}))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def _contend(url: str, mode: str, n: int) -> list[dict]:
    start = time.time() + 3.0  # both processes are up and connected by then
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, mode, str(start), str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _check_keys(results: list[dict], n: int) -> None:
    a, b = (set(r["out"]) for r in results)
    assert not a & b, f"both processes took {sorted(a & b)}"
    assert a | b == {f"model/{i}" for i in range(n)}


def _check_mutex(results: list[dict]) -> None:
    spans = sorted((t0, t1, r["holder"]) for r in results for t0, t1 in r["out"])
    for (_, end, who), (start, _, other) in itertools.pairwise(spans):
        assert start >= end, f"{other} entered at {start} before {who} left at {end}"
    assert {who for *_, who in spans} == {r["holder"] for r in results}  # both got turns


# -- one process ------------------------------------------------------------------------------


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path}/leases.db"


def test_acquire_refuse_release(url):
    a, b = LeaseStore(url, ttl_s=60, holder="a"), LeaseStore(url, ttl_s=60, holder="b")
    assert a.try_acquire("m/1")
    assert a.try_acquire("m/1")  # re-entrant for the same holder (renews)
    assert not b.try_acquire("m/1")
    held = b.current("m/1")
    assert held is not None and held.holder == "a" and "held by a" in held.describe()
    assert b.try_acquire("m/2")  # other keys are independent
    b.release("m/1")  # not b's: nothing happens
    assert not b.try_acquire("m/1")
    a.release("m/1")
    assert a.current("m/1") is None
    assert b.try_acquire("m/1")


def test_expired_lease_is_taken_over(url):
    a, b = LeaseStore(url, ttl_s=0.3, holder="a"), LeaseStore(url, ttl_s=60, holder="b")
    assert a.try_acquire("m/1")
    assert not b.try_acquire("m/1")
    time.sleep(0.4)
    assert a.current("m/1") is None  # expired
    assert b.try_acquire("m/1")
    assert not a.renew("m/1")  # a lost it
    assert b.current("m/1").holder == "b"


def test_hold_renews_while_working(url):
    a, b = LeaseStore(url, ttl_s=0.6, holder="a"), LeaseStore(url, ttl_s=60, holder="b")
    with a.hold("m/1") as lease:
        assert lease.acquired
        time.sleep(1.5)  # more than two ttls: only the heartbeat keeps it
        assert not b.try_acquire("m/1")
        assert lease.still_ours()
        with b.hold("m/1") as other:
            assert not other.acquired and other.holder.holder == "a"
    assert a.current("m/1") is None  # released on exit
    assert b.try_acquire("m/1")


def test_bad_ttl(url):
    with pytest.raises(ValueError, match="ttl_s must be positive"):
        LeaseStore(url, ttl_s=0)


def test_two_processes_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path}/leases.db"
    LeaseStore(url)  # create the table up front, as the nightly does before its loop
    _check_keys(_contend(url, "keys", 40), 40)
    _check_mutex(_contend(url, "mutex", 15))


# -- PostgreSQL -------------------------------------------------------------------------------


@pytest.mark.postgres
def test_two_processes_postgres(pg_url):
    # no table up front: the two processes race to create it too
    _check_keys(_contend(pg_url, "keys", 40), 40)
    _check_mutex(_contend(pg_url, "mutex", 15))
    store = LeaseStore(pg_url, ttl_s=60, holder="x")
    assert store.try_acquire("pg/1") and not LeaseStore(pg_url, holder="y").try_acquire("pg/1")
    store.dispose()
