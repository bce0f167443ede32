"""Hostile names (issue 8, test 8): keys and namespaces that break naive backends.

Names are generated deterministically (seeded) from fragments that trip up file systems,
INI files, SQL, Redis key patterns and Unicode handling: separators (``/ \\ : . = [ ] ; #``,
newline, CR, tab), glob patterns (``* ? [a-z] {a,b}``), SQL and ``LIKE`` characters
(``% _ '``), Unicode look-alikes (NFC/NFD, NFKC, case folding), right-to-left and
zero-width marks, astral characters, ``.``/``..``, NUL and every control character,
Windows device names, the encoded forms the backends themselves produce (``%2e``, ``^a``,
``~`` + SHA-256, ``%25``, ``%7D``), and keys of 139 to 10,000 characters. The library's
own :data:`~mappingstore.testing.HOSTILE_KEYS` and
:data:`~mappingstore.testing.HOSTILE_NAMESPACE_PAIRS` are always included.

On memory and every persistent backend the tests count:

* **collisions**: a key whose read-back value is not the value written to it (every pair
  gets a distinct value, so two names sharing storage always show);
* **leaks**: a key listed in (or missing from) a namespace against what was written there,
  a wrong ``len``, a namespace listed that holds nothing, and the same after clearing or
  deleting in other namespaces (clearing ``a*`` must leave ``ab``);
* **escapes** (directory backend): a file or directory created outside the store's root, a
  path under the root that resolves outside it, a symlink, or a name component that no
  portable file system accepts.

Invalid names (the empty string, lone surrogates, non-``str``, namespaces starting with
NUL) must raise :class:`~mappingstore.errors.InvalidKeyError` or
:class:`~mappingstore.errors.KeyTypeError` and change nothing.
"""

from __future__ import annotations

import os
import random
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import mappingstore
from mappingstore import MemoryStore, Store
from mappingstore._directory import encode_name
from mappingstore.errors import (
    InvalidKeyError,
    InvalidOptionError,
    KeyTypeError,
    MappingStoreError,
)
from mappingstore.testing import HOSTILE_KEYS, HOSTILE_NAMESPACE_PAIRS
from tests.servers import POSTGRES_URL
from tests.torture.harness import PERSISTENT, Target, make_target, reps

BACKENDS: tuple[str, ...] = ("memory", *PERSISTENT)

# -- hostile names ----------------------------------------------------------------------------

SEPARATORS = ["/", "\\", ":", "::", ".", "=", "[", "]", ";", "#", "\n", "\r", "\t", "\r\n"]
SEPARATORS += [",", "|", "&", "?", " ", "{", "}", "@", "!", "\x85", "\u2028", "\u2029"]
GLOBS = ["*", "?", "[a-z]", "{a,b}", "[!a]", "**", "\\*", "\\?", "[", "]", "^", "$", "[ab]"]
SQL = ["%", "_", "'", '"', "%_", "\\%", "\\_", "''", "--", "/*", "*/", "`", "'; DROP TABLE t; --"]
UNICODE = [
    "é",  # NFC
    "e\u0301",  # NFD of the same
    "\u00c5",  # A WITH RING ABOVE
    "A\u030a",  # its NFD
    "\u212b",  # ANGSTROM SIGN (NFC: U+00C5)
    "\u2126",  # OHM SIGN (NFC: OMEGA)
    "\u03a9",
    "\u212a",  # KELVIN SIGN (NFC: K)
    "K",
    "ﬁ",
    "fi",
    "ß",
    "ss",
    "\u1e9e",  # CAPITAL SHARP S
    "\u0130",  # I WITH DOT ABOVE (lower(): i + combining dot)
    "i\u0307",
    "\u0131",  # DOTLESS I
    "\u202e",  # RIGHT-TO-LEFT OVERRIDE
    "\u202d",
    "\u200f",  # RIGHT-TO-LEFT MARK
    "\u200e",
    "مفتاح",
    "מפתח",
    "\u200b",  # ZERO WIDTH SPACE
    "\u200c",
    "\u200d",
    "\u2060",
    "\ufeff",
    "\u00ad",  # SOFT HYPHEN
    "😀",
    "👨\u200d👩\u200d👧",
    "\U0001d400",  # MATHEMATICAL BOLD CAPITAL A
    "\U000e0041",  # TAG LATIN CAPITAL LETTER A
    "\U00010000",
    "\U0010ffff",
    "\uffff",
    "\ufffe",
    "\ufffd",
    "\uff0f",  # FULLWIDTH SOLIDUS
    "\uff0e",  # FULLWIDTH FULL STOP
    "\u2215",  # DIVISION SLASH
    "\u2044",  # FRACTION SLASH
    "\uff3c",  # FULLWIDTH REVERSE SOLIDUS
    "\u00a0",
    "\u3000",
    "日本",
    "\u0301",  # a lone combining mark
]
DOTS = [".", "..", "...", "./", "../", "/..", "\\..", "..\\", "%2e%2e", "%2e", "%2F", "%252F"]
CONTROLS = [chr(c) for c in range(0x20)] + ["\x7f"] + [chr(c) for c in range(0x80, 0xA0)]
RESERVED = ["CON", "con", "nul", "NUL", "nul.txt", "PRN", "AUX", "aux.c", "COM1", "com9", "LPT1"]
RESERVED += ["lpt0.tar.gz", "CONIN$", "CLOCK$", "desktop.ini", ".git", ".mappingstore", ".lock"]
RESERVED += [".journal", ".tmp", ".namespace", ".expiring", "~", "^a", "%41", "%25", "%7D", "}"]
WORDS = ["a", "b", "A", "ab", "x", "y", "key", "default", "0", "00", "-1", "None", "tt", "i", "x"]
WORDS += ["a:00", "}:i", "{a", ":{", "%00", "%%", "a b", "1e3", "true", "null", "$bytes", "!ms1:"]

POOLS: list[list[str]] = [SEPARATORS, GLOBS, SQL, UNICODE, DOTS, CONTROLS, RESERVED, WORDS]


LONG_LENGTHS = (139, 140, 141, 142, 254, 255, 256, 1_000, 4_096, 10_000)


def _long_names(lengths: tuple[int, ...] = LONG_LENGTHS) -> list[str]:
    """Names at and around the length limits of file names (140 encoded characters on the
    directory backend, 255 bytes on most file systems) and far beyond."""
    names = []
    for n in lengths:
        names += ["a" * n, "A" * (n // 2), "é" * (n // 6), "/" * n, "." * n, "😀" * (n // 4)]
    names += ["x" * 10_000 + "\x00", "\x00" + "x" * 10_000, "x" * 9_999 + "é"]
    # Around a 1,024-byte cut (PostgreSQL indexes longer names by their first 1,024 bytes
    # plus a hash): same first 1,024 bytes, a multi-byte character across the cut.
    names += ["p" * 1_024, "p" * 1_024 + "a", "p" * 1_024 + "b", "p" * 1_023 + "é"]
    names += ["p" * 1_023 + "éa", "p" * 1_022 + "😀", "é" * 512, "é" * 512 + "a", "é" * 513]
    # The hashed form the directory backend gives long names, as a key of its own.
    names += [h for h in map(encode_name, names[:40]) if h.startswith("~")][:12]
    return list(dict.fromkeys(names))


#: Prefixes that a LIKE, GLOB or SCAN MATCH pattern, or a byte cut, would get wrong.
PREFIXES = ["%", "_", "a*", "*", "?", "[", "[a-z]", "\\", "'", "\x00", "é", "e", "e\u0301"]
PREFIXES += [".", "..", "/", "~", "%2", "a", "A", "x" * 5_000, "p" * 1_023, "p" * 1_024]
PREFIXES += ["p" * 1_023 + "é", "p" * 1_024 + "a", "é" * 512, "é" * 100, "😀", "\U0010ffff"]


def hostile_names(seed: int, count: int, *, max_tokens: int = 5) -> list[str]:
    """*count* distinct hostile names, deterministic for *seed*: chains of 1 to *max_tokens*
    fragments, plus the encoded forms the backends would give some of them."""
    rng = random.Random(seed)
    names: dict[str, None] = {}
    while len(names) < count:
        parts = [rng.choice(rng.choice(POOLS)) for _ in range(rng.randint(1, max_tokens))]
        name = "".join(parts)
        names[name] = None
        if rng.random() < 0.05 and len(names) < count:
            names[encode_name(name)] = None  # the directory encoding of a name, as a name
    return list(names)


def hostile_keys(count: int, lengths: tuple[int, ...] = LONG_LENGTHS) -> list[str]:
    """The library's hostile keys, long names, then generated ones: *count* in all."""
    keys = dict.fromkeys([*HOSTILE_KEYS, *_long_names(lengths)])
    for name in hostile_names(8, count):
        if len(keys) >= count:
            break
        keys[name] = None
    return list(keys)


#: Namespace groups where a glob pattern or a concatenation would reach another namespace.
GLOB_NAMESPACES: dict[str, str] = {
    # pattern (cleared in the delete phase) -> a literal it matches (must survive)
    "a*": "ab",
    "a?": "ax",
    "[ab]": "b",
    "a[": "a[b",
    "*": "x",
    "?": "y",
    "a%": "a%b",
    "a_": "a_b",
    "{a,b}": "a,b",
    "a\\": "a\\*",
    "%25": "%",
    "%7D": "}",
}


def hostile_namespaces(count: int) -> list[str]:
    """*count* distinct namespaces: ``default``, then the glob groups, the library's pairs,
    separator pairs whose concatenations collide and long names, interleaved (so the fast
    tier's first few namespaces hold some of each), then generated names."""
    groups: list[list[tuple[str, ...]]] = [
        list(GLOB_NAMESPACES.items()),
        [(ns1, ns2) for (ns1, _), (ns2, _) in HOSTILE_NAMESPACE_PAIRS],
        [("x", f"x{sep}y") for sep in [*SEPARATORS, "%", "_", "\x00"]],
        [("n" * 1_024, "n" * 1_024 + "a"), ("n" * 1_024 + "b", "n" * 1_023 + "é", "N" * 2_000)],
    ]
    names: dict[str, None] = {"default": None}
    for row in range(max(len(group) for group in groups)):
        for group in groups:
            if row < len(group):
                names.update(dict.fromkeys(group[row]))
    for name in hostile_names(10, count):
        if len(names) >= count:
            break
        if not name.startswith("\x00"):
            names[name] = None
    return list(names)[:count]


def namespace_plan(
    namespaces: list[str], per_namespace: int, seed: int = 11
) -> dict[str, list[str]]:
    """The keys of each namespace: a shared pool (so the same key lives in many
    namespaces), plus for ``x`` and ``x<sep>y`` the keys whose concatenations collide."""
    rng = random.Random(seed)
    pool = hostile_names(12, max(per_namespace * 3, 100), max_tokens=3)
    plan: dict[str, list[str]] = {}
    for ns in namespaces:
        special: list[str] = []
        if ns == "x":
            special = [f"y{sep}z" for sep in [*SEPARATORS, "%", "_", "\x00"]]
        elif ns.startswith("x") and ns.endswith("y") and len(ns) > 2:
            special = ["z"]
        for (ns1, k1), (ns2, k2) in HOSTILE_NAMESPACE_PAIRS:
            special += [k for n, k in ((ns1, k1), (ns2, k2)) if n == ns]
        keys = dict.fromkeys(special)
        for key in rng.sample(pool, per_namespace):
            if len(keys) >= per_namespace:
                break
            keys[key] = None
        plan[ns] = list(keys)
    return plan


# -- where the data goes -------------------------------------------------------------------------


#: Names are encoded the same whether or not each write is fsynced; skipping the fsyncs
#: (still atomic) lets the long tier write 100,000 files within its budget.
NAME_TEST_OPTIONS: dict[str, dict[str, Any]] = {
    "dir": {"durable": False},
    "ini": {"durable": False},
}


@dataclass
class Location:
    """A fresh location on one backend; ``open(namespace=...)`` any number of times.

    PostgreSQL stores share one connection pool (a ready ``ConnectionPool`` is a documented
    way to open them): a hundred namespaces then cost a hundred opens of a table, not a
    hundred connections.
    """

    backend: str
    url: str
    target: Target | None
    root: Path | None = None
    pool: Any = None

    def open(self, **options: Any) -> Store:
        options = {**NAME_TEST_OPTIONS.get(self.backend, {}), **options}
        if self.pool is not None:
            from mappingstore import PostgresStore

            assert self.target is not None
            return PostgresStore(self.pool, table=self.target.name, **options)
        return mappingstore.open(self.url, **options)

    def cleanup(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.target is not None:
            self.target.cleanup()
        else:
            MemoryStore.drop(self.url.removeprefix("memory://"))


@pytest.fixture
def location(backend: str, tmp_path: Path) -> Iterator[Location]:
    """A fresh location; the directory store's root is ``tmp_path/jail/<root>`` so that
    anything created beside the root (in ``jail``) or above it shows as an escape."""
    if backend == "memory":
        made = Location(backend, f"memory://hostile-{uuid.uuid4().hex}", None)
    else:
        (tmp_path / "jail").mkdir()
        target = make_target(backend, tmp_path / "jail")
        made = Location(backend, target.url, target, target.path if backend == "dir" else None)
        if backend == "postgres":
            from psycopg_pool import ConnectionPool

            made.pool = ConnectionPool(
                POSTGRES_URL, kwargs={"autocommit": True}, min_size=1, max_size=2, open=True
            )
    try:
        yield made
    finally:
        made.cleanup()


def tree(top: Path) -> set[str]:
    """Every path under *top* (directories and files), relative to it."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), top))
    return found


_PORTABLE = set("abcdefghijklmnopqrstuvwxyz0123456789-_.%^~")


def escapes(tmp_path: Path, root: Path) -> list[str]:
    """What the directory store made outside *root* or in a form that could lead out."""
    bad = []
    real_root = os.path.realpath(root)
    jail = os.path.relpath(root, tmp_path)
    for rel in tree(tmp_path):
        if rel != "jail" and rel != jail and not rel.startswith(jail + os.sep):
            bad.append(f"outside the root: {rel}")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                bad.append(f"symlink: {path}")
            if not os.path.realpath(path).startswith(real_root + os.sep):
                bad.append(f"resolves outside the root: {path}")
            if len(name.encode()) > 255 or not set(name) <= _PORTABLE or name in (".", ".."):
                bad.append(f"unportable name: {name!r}")
    return bad


# -- checks ------------------------------------------------------------------------------------


def write_all(store: Store, items: dict[str, int], *, batched: bool = True) -> None:
    """Write *items* in atomic chunks of 1,000 (one transaction, pipeline or file rewrite
    each), or one by one."""
    if not batched:
        for key, value in items.items():
            store[key] = value
        return
    chunk = 1_000
    keys = list(items)
    for i in range(0, len(keys), chunk):
        store.set_many({k: items[k] for k in keys[i : i + chunk]})


def count_wrong(store: Store, expected: dict[str, int]) -> tuple[int, int]:
    """``(collisions, leaks)`` of one namespace against *expected* (key -> its value).

    A collision is a key that reads back another key's value (through the listing or by
    name); a leak is a key listed that was not written here, a key listed twice, a written
    key not listed or not readable by name, or a wrong ``len``.
    """
    pairs = list(store.items())
    listed = [k for k, _ in pairs]
    leaks = len(set(listed) ^ set(expected)) + len(listed) - len(set(listed))
    leaks += len(store) != len(expected)
    collisions = sum(1 for k, v in pairs if k in expected and v != expected[k])
    got = store.get_many(list(expected))
    leaks += len(set(expected) - set(got))
    collisions += sum(1 for k, v in got.items() if v != expected[k])
    return collisions, leaks


@pytest.mark.parametrize("backend", BACKENDS)
def test_hostile_keys_round_trip_exactly(
    backend: str, tier: str, location: Location, tmp_path: Path, figure: Callable[..., None]
) -> None:
    """10,000 hostile keys (long tier) in one namespace: each is written with its own value,
    lists exactly (the listing equals the set written, no normalisation, no duplicates),
    reads back its own value through ``[]``, ``get_many`` and ``items()`` (0 collisions),
    survives close and reopen, and deleting half of them leaves exactly the other half."""
    long = tier == "long"
    # The fast tier keeps fewer long names: the directory backend re-encodes every hashed
    # name on each listing, at up to ~40 ms a name (see the report of issue 8).
    keys = hostile_keys(reps(tier, 1_000, 10_000), LONG_LENGTHS if long else (140, 141, 256))
    expected = {k: i for i, k in enumerate(keys)}
    by_name = keys if long else keys[:: len(keys) // 200]  # one round trip per key
    started = time.perf_counter()
    with location.open() as store:
        write_all(store, expected)
        collisions, leaks = count_wrong(store, expected)
        collisions += sum(1 for k in by_name if store[k] != expected[k])
        leaks += sum(1 for k in by_name if k not in store)
    with location.open() as store:  # what the backend kept, read by a fresh instance
        collisions2, leaks2 = count_wrong(store, expected)
        # Prefix listings are exact: never a pattern, never cut. (A directory store lists
        # and decodes every file for each prefix: a third of them fit its budget.)
        for prefix in PREFIXES if long and backend != "dir" else PREFIXES[::3]:
            got = list(store.names(prefix))
            want = {k for k in keys if k.startswith(prefix)}
            leaks2 += len(set(got) ^ want) + len(got) - len(set(got))
        half = keys[::2]
        one_by_one = reps(tier, 50, 200)
        for k in half[:one_by_one]:
            del store[k]
        assert store.delete_many(half[one_by_one:]) == len(half[one_by_one:])
        for k in half:
            expected.pop(k)
        collisions3, leaks3 = count_wrong(store, expected)
        assert store.namespaces() == ["default"]
    collisions += collisions2 + collisions3
    leaks += leaks2 + leaks3
    bad = escapes(tmp_path, location.root) if location.root is not None else []
    figure("keys", len(keys), backend=backend, tier=tier)
    figure("collisions", collisions, backend=backend, tier=tier)
    figure("leaks", leaks, backend=backend, tier=tier)
    if location.root is not None:
        figure("escapes", len(bad), backend=backend, tier=tier)
    figure("seconds", round(time.perf_counter() - started, 2), backend=backend, tier=tier)
    assert (collisions, leaks, bad) == (0, 0, [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_hostile_namespace_pairs_never_collide_or_leak(
    backend: str, tier: str, location: Location, tmp_path: Path, figure: Callable[..., None]
) -> None:
    """100,000 (namespace, key) pairs (long tier) over 100 hostile namespaces: every pair
    reads back its own value (0 collisions); each namespace lists exactly its own keys with
    the right ``len`` and ``namespaces()`` lists exactly the namespaces written (0 leaks);
    clearing or deleting in one namespace (``a*``, ``[ab]``, ``a%``...) leaves every other
    one (``ab``, ``b``, ``a%b``...) intact; on the directory backend nothing is created
    outside the root."""
    count, per_namespace = (100, 1_000) if tier == "long" else (20, 100)
    namespaces = hostile_namespaces(count)
    plan = namespace_plan(namespaces, per_namespace)
    expected: dict[str, dict[str, int]] = {}
    n = 0
    for ns, keys in plan.items():
        expected[ns] = {}
        for key in keys:
            expected[ns][key] = n
            n += 1
    started = time.perf_counter()
    for i, (ns, items) in enumerate(expected.items()):
        with location.open(namespace=ns) as store:
            # A multi-key write rewrites a shared memory store's whole data segment: there,
            # most namespaces are written key by key (its fast path), every tenth batched.
            write_all(store, items, batched=backend != "shm" or i % 10 == 0)
    collisions = leaks = 0
    with location.open() as store:
        leaks += len(set(store.namespaces()) ^ set(namespaces))
    # Check each namespace, then delete in it: the glob patterns are cleared, their
    # literals stay; a later namespace's check also shows what earlier deletes reached.
    for i, ns in enumerate(namespaces):
        with location.open(namespace=ns) as store:
            c, lk = count_wrong(store, expected[ns])
            collisions, leaks = collisions + c, leaks + lk
            if ns in GLOB_NAMESPACES or (ns not in GLOB_NAMESPACES.values() and i % 4 == 0):
                store.clear()
                expected[ns] = {}
            elif i % 4 == 1:
                half = list(expected[ns])[::2]
                assert store.delete_many(half) == len(half)
                for key in half:
                    del expected[ns][key]
            elif i % 4 == 2:
                for key in list(expected[ns])[:3]:
                    assert store.pop(key) == expected[ns].pop(key)
    for ns, items in expected.items():
        with location.open(namespace=ns) as store:
            c, lk = count_wrong(store, items)
            collisions, leaks = collisions + c, leaks + lk
    with location.open() as store:
        leaks += len(set(store.namespaces()) ^ {ns for ns, items in expected.items() if items})
    bad = escapes(tmp_path, location.root) if location.root is not None else []
    figure("pairs", n, backend=backend, tier=tier, namespaces=len(namespaces))
    figure("collisions", collisions, backend=backend, tier=tier)
    figure("leaks", leaks, backend=backend, tier=tier)
    if location.root is not None:
        figure("escapes", len(bad), backend=backend, tier=tier)
    figure("seconds", round(time.perf_counter() - started, 2), backend=backend, tier=tier)
    assert (collisions, leaks, bad) == (0, 0, [])


INVALID_KEYS: list[Any] = ["", "\ud800", "a\udfffb", "\udc80" * 3, b"key", 1, None, ("a",)]
INVALID_NAMESPACES: list[Any] = ["", "\x00", "\x00meta\x00", "\ud800", b"ns", 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_names_raise_and_change_nothing(
    backend: str, location: Location, tmp_path: Path, figure: Callable[..., None]
) -> None:
    """Invalid keys (empty, lone surrogates, not ``str``) raise ``InvalidKeyError`` or
    ``KeyTypeError`` from every entry point, alone, inside ``set_many`` and inside a
    ``batch`` with valid keys, and leave the store exactly as it was; invalid namespaces
    (empty, starting with NUL, lone surrogates, not ``str``) are refused at open."""
    with location.open() as store:
        store.update({"kept": 1, "x/y": 2, "é": 3})
    before = {"kept": 1, "x/y": 2, "é": 3}
    files_before = tree(location.root) if location.root is not None else set()
    raised = 0
    calls: list[Callable[[Store, Any], object]] = [
        lambda s, k: s.__setitem__(k, 9),
        lambda s, k: s[k],
        lambda s, k: s.__delitem__(k),
        lambda s, k: k in s,
        lambda s, k: s.get(k),
        lambda s, k: s.pop(k, None),
        lambda s, k: s.setdefault(k, 9),
        lambda s, k: s.modify(k, lambda v: 9, default=0),
        lambda s, k: s.set_many({"new": 9, k: 9}),
        lambda s, k: s.update([("new", 9), (k, 9)]),
        lambda s, k: s.get_many(["kept", k]),
        lambda s, k: s.delete_many(["kept", k]),
        _batch_with(lambda s, k: s.__setitem__(k, 9)),
        _batch_with(lambda s, k: s.__delitem__(k)),
    ]
    with location.open() as store:
        for key in INVALID_KEYS:
            for call in calls:
                with pytest.raises((InvalidKeyError, KeyTypeError)):
                    call(store, key)
                raised += 1
                assert dict(store.items()) == before, (key, call)
    for ns in INVALID_NAMESPACES:
        with pytest.raises((InvalidKeyError, KeyTypeError)):
            location.open(namespace=ns)
        raised += 1
    with location.open() as store:
        assert dict(store.items()) == before
        assert store.namespaces() == ["default"]
    if location.root is not None:
        assert tree(location.root) == files_before
        assert escapes(tmp_path, location.root) == []
    figure("invalid names refused", raised, backend=backend)
    assert issubclass(InvalidKeyError, MappingStoreError) and issubclass(
        KeyTypeError, MappingStoreError
    )


def _batch_with(call: Callable[[Store, Any], object]) -> Callable[[Store, Any], object]:
    """*call* inside a batch that first writes a valid key: the whole batch must be dropped."""

    def run(store: Store, key: Any) -> None:
        with store.batch():
            store["new"] = 9
            call(store, key)

    return run


@pytest.mark.parametrize("backend", ["redis"])
def test_redis_glob_namespaces_and_prefixes_do_not_over_match(
    backend: str, location: Location, figure: Callable[..., None]
) -> None:
    """Redis: namespaces that are ``SCAN MATCH`` patterns (``a*``, ``a?``, ``[ab]``, ``\\*``)
    list, count, clear and purge only themselves, never ``ab``/``ax``/``b``/``*``; a store
    whose prefix extends another's (``P`` and ``P.x``/``P:x``) sees none of its keys; a
    prefix with glob characters is refused."""
    assert location.target is not None
    namespaces = ["a", "ab", "ax", "b", "a*", "a?", "[ab]", "\\*", "*", "a\\", "{a", "a}"]
    others = [f"{location.url}.x", f"{location.url}:x", f"{location.url}_"]
    for ns in namespaces:
        with location.open(namespace=ns) as store:
            store.update({"k": ns, ns: ns, "a*": ns})
    for url in others:
        for ns in namespaces:
            with mappingstore.open(url, namespace=ns) as store:
                store.update({"k": url, "other": url})
    try:
        leaks = 0
        for ns in namespaces:
            with location.open(namespace=ns) as store:
                leaks += dict(store.items()) != {"k": ns, ns: ns, "a*": ns}
                leaks += store.purge_expired() != 0
        with location.open() as store:
            leaks += store.namespaces() != sorted(namespaces)
        for ns in ["a*", "a?", "[ab]", "\\*", "*"]:
            with location.open(namespace=ns) as store:
                store.clear()
        survivors = ["a", "ab", "ax", "b", "a\\", "{a", "a}"]
        for ns in survivors:
            with location.open(namespace=ns) as store:
                leaks += dict(store.items()) != {"k": ns, ns: ns, "a*": ns}
        with location.open() as store:
            leaks += store.namespaces() != sorted(survivors)
        for url in others:
            with mappingstore.open(url) as store:
                leaks += store.namespaces() != sorted(namespaces)
        figure("leaks", leaks, backend=backend, namespaces=len(namespaces), prefixes=4)
        assert leaks == 0
        base = location.url.split("?")[0]
        for bad in ("*", "a*", "t?", "[ab]", "x{y}", "a\\b"):
            with pytest.raises(InvalidOptionError, match="prefix"):
                mappingstore.open(f"{base}?prefix={urllib.parse.quote(bad, safe='')}")
    finally:
        for url in others:
            Target("redis", url, name=url.split("prefix=")[1]).cleanup()
