"""Two processes writing one series and one event log lose nothing (every shared backend).

Each backend that exists joins automatically: the URL list below is filtered by what
imports. Server backends follow tests/servers.py (skip on a laptop, fail in CI).
"""

from __future__ import annotations

import importlib
import multiprocessing
import operator
import uuid
from pathlib import Path

import pytest

import mappingstore
from tests.servers import POSTGRES_URL, REDIS_URL, unavailable

N = 150  # per process: enough to interleave, small enough for CI


def _worker(url: str, namespace: str, offset: int) -> None:
    with mappingstore.open(url, namespace=namespace) as store:
        series = store.series("shared")
        log = store.events("shared")
        for i in range(N):
            series[offset + i * 2] = i
            log.apply({"count": (operator.add, 1)})


def _urls(tmp: Path) -> list[tuple[str, str]]:
    candidates = [
        ("sqlite", "mappingstore._sqlite", f"sqlite:///{tmp}/ts.db"),
        ("dir", "mappingstore._directory", f"dir:///{tmp}/ts-dir"),
        ("ini", "mappingstore._ini", f"ini:///{tmp}/ts.ini"),
        ("shm", "mappingstore._shm", f"shm://ms-ts-{uuid.uuid4().hex[:8]}"),
        ("postgres", "mappingstore._postgres", POSTGRES_URL),
        ("redis", "mappingstore._redis", REDIS_URL),
    ]
    out = []
    for name, module, url in candidates:
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        out.append((name, url))
    return out


@pytest.mark.parametrize("backend", ["sqlite", "dir", "ini", "shm", "postgres", "redis"])
def test_two_processes_lose_no_point_and_no_event(backend: str, tmp_path: Path) -> None:
    urls = dict(_urls(tmp_path))
    if backend not in urls:
        pytest.skip(f"the {backend} backend is not built yet")
    url = urls[backend]
    namespace = f"mp-{uuid.uuid4().hex[:8]}"
    try:
        setup = mappingstore.open(url, namespace=namespace)
    except mappingstore.BackendUnavailableError as exc:
        unavailable(backend, exc)
    try:
        setup.events("shared").apply({"count": 0}, 1)
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(url, namespace, off)) for off in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
        series = setup.series("shared")
        assert len(series) == 2 * N
        assert sorted(series) == list(range(2 * N))
        log = setup.events("shared")
        assert log.current() == {"count": 2 * N}
        assert len(log) == 2 * N + 1
    finally:
        setup.series("shared").remove()
        setup.events("shared").remove()
        unlink = getattr(setup, "unlink", None)
        if unlink is not None:
            unlink()  # shared memory: leave nothing in /dev/shm (unlink also closes)
        setup.close()
