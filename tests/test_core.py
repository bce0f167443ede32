"""Unit tests of the core below the stores: codec, crypto, URLs, registry, errors, logging."""

from __future__ import annotations

import builtins
import datetime
import inspect
import json
import logging
import random
import threading
import zlib
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mappingstore
from mappingstore import MemoryStore, errors
from mappingstore._codec import (
    MAX_EXT_DEPTH,
    PLAIN_HEADER,
    decode_plain,
    decode_plain_many,
    pack,
    unpack,
    wrap_plain,
)
from mappingstore._crypto import (
    KEY_SIZE,
    SECURITY_LEVELS,
    Cipher,
    KeySlot,
    aad_for,
    derive_kek,
    new_slot,
    random_key,
    unwrap,
)
from mappingstore._registry import _SCHEMES, known_schemes, register_scheme
from mappingstore._url import file_path, parse_url, redact
from mappingstore.errors import (
    CorruptValueError,
    IntegrityError,
    InvalidOptionError,
    InvalidURLError,
    MappingStoreError,
    SerializationError,
    StoreCorruptError,
    UnknownSchemeError,
    WrongPasswordError,
)
from mappingstore.testing import VALUE_SAMPLES, assert_same

# -- codec --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [v for _, v in VALUE_SAMPLES], ids=[n for n, _ in VALUE_SAMPLES])
def test_codec_round_trip(value: Any) -> None:
    record = wrap_plain(pack(value))
    assert record[:2] == PLAIN_HEADER
    assert_same(decode_plain(record), value)


def test_codec_reads_old_three_item_time_records() -> None:
    import datetime as dt

    old = msgpack.packb(msgpack.ExtType(7, msgpack.packb(["08:15:00", 7_200_000_000, 0])))
    assert_same(unpack(old), dt.time(8, 15, tzinfo=dt.timezone(dt.timedelta(hours=2))))


def test_random_bytes_never_decode_into_a_wrong_value() -> None:
    rng = random.Random(20_000)
    decoded = 0
    for i in range(20_000):
        data = rng.randbytes(rng.randint(0, 40))
        if i % 2:  # half of them look like plain records, so the CRC is what stops them
            data = PLAIN_HEADER + data
        try:
            value = decode_plain(data)
        except CorruptValueError:
            continue
        # Only a genuine record may decode, and then into exactly what it encodes.
        decoded += 1
        assert wrap_plain(pack(value)) == data
    assert decoded < 5


def test_random_records_through_a_store_raise_corrupt() -> None:
    rng = random.Random(7)
    with MemoryStore() as store:
        for _ in range(2_000):
            data = PLAIN_HEADER + rng.randbytes(rng.randint(0, 30))
            store._put("default", "k", data, None)
            with pytest.raises(CorruptValueError):
                store["k"]


@given(st.binary(max_size=64))
def test_unpack_garbage_raises_only_corrupt(payload: bytes) -> None:
    try:
        unpack(payload)
    except CorruptValueError:
        pass


_MSGPACK_VALUES = st.recursive(
    st.none()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=5)
    | st.binary(max_size=5)
    | st.floats(),
    lambda c: st.lists(c, max_size=5),
    max_leaves=8,
)


@given(
    code=st.integers(0, 127),
    inner=st.binary(max_size=20) | _MSGPACK_VALUES.map(lambda v: msgpack.packb(v)),
)
def test_crafted_extension_payloads_raise_only_corrupt(code: int, inner: bytes) -> None:
    """A record with a valid CRC but a hostile ext payload still only raises CorruptValueError."""
    record = wrap_plain(msgpack.packb(msgpack.ExtType(code, inner)))
    try:
        decode_plain(record)
    except CorruptValueError:
        pass


@pytest.mark.parametrize(
    "zone", ["Europe", "", "../../etc/passwd", "/etc/passwd", "\x00", "Nope/Nope"]
)
def test_hostile_zone_names_do_not_escape(zone: str) -> None:
    payload = msgpack.packb(["2024-01-01T00:00:00", 3_600_000_000, zone, 0, None])
    record = msgpack.packb(msgpack.ExtType(5, payload))
    try:
        value = unpack(record)
    except CorruptValueError:
        return
    assert value.utcoffset().total_seconds() == 3600


@pytest.mark.parametrize("zone", ["Europe", "Nope/Nope", "", "../x"])
def test_typed_json_with_unknown_zone_keeps_the_offset(zone: str) -> None:
    text = '{"d": {"$datetime": "2024-01-01T00:00:00+01:00", "zone": %s, "fold": 0}}'
    with MemoryStore() as store:
        store.import_json(text % json.dumps(zone))
        assert store["d"].utcoffset() == datetime.timedelta(hours=1)


def test_unknown_extension_type_is_corrupt() -> None:
    for code in (0, 4, 13, 50, 127):
        with pytest.raises(CorruptValueError):
            unpack(msgpack.packb(msgpack.ExtType(code, b"\x00")))


def test_deep_nesting() -> None:
    shallow: Any = "leaf"
    for _ in range(200):  # plain lists nest inside one msgpack call: no limit but msgpack's
        shallow = [shallow]
    assert_same(unpack(pack(shallow)), shallow)
    deep: Any = None
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(SerializationError):
        pack(deep)


def test_extension_nesting_is_capped_symmetrically() -> None:
    """Tuples/sets nest through a msgpack call each; too deep would overflow the C stack."""
    nested: Any = datetime.date(2024, 1, 1)  # a date payload is text: no nesting of its own
    for _ in range(MAX_EXT_DEPTH):
        nested = (nested,) if len(repr(nested)) % 2 else frozenset({nested})
    assert_same(unpack(pack(nested)), nested)  # the deepest value that can be written reads back
    with pytest.raises(SerializationError):
        pack((nested,))
    deep_tuple: Any = None
    for _ in range(100_000):
        deep_tuple = (deep_tuple,)
    with pytest.raises(SerializationError):
        pack(deep_tuple)


def test_deep_values_in_a_thread() -> None:
    nested: Any = None
    for _ in range(MAX_EXT_DEPTH):
        nested = (nested,)
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(unpack(pack(nested))))
    thread.start()
    thread.join()
    assert results == [nested]


def test_deeply_nested_garbage_is_corrupt() -> None:
    with pytest.raises(CorruptValueError):
        unpack(b"\x91" * 200_000 + b"\xc0")
    for depth in (MAX_EXT_DEPTH + 1, 200, 3_000):  # 200 used to crash the interpreter
        data = msgpack.packb(None)
        for _ in range(depth):  # tuples inside tuples: recursion through the ext hook
            data = msgpack.packb(msgpack.ExtType(1, b"\x91" + data))
        with pytest.raises(CorruptValueError):
            unpack(data)


def test_crc_guards_every_plain_bit() -> None:
    good = wrap_plain(pack({"a": [1, 2, 3]}))
    for bit in range(16, len(good) * 8):
        bad = bytearray(good)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptValueError):
            decode_plain(bytes(bad))
    for cut in range(len(good)):
        with pytest.raises(CorruptValueError):
            decode_plain(good[:cut])
    assert zlib.crc32(good[6:]).to_bytes(4, "big") == good[2:6]


def test_decode_plain_many_matches_one_by_one_or_declines() -> None:
    values = [{"a": [1, 2, 3]}, (1, "x"), None, 2**70, "é" * 300, b"\x00", [], {}]
    good = [wrap_plain(pack(v)) for v in values]
    assert decode_plain_many(good) == [decode_plain(r) for r in good]
    assert decode_plain_many([]) == []
    # Any record decode_plain would refuse makes the whole page decline (None); the caller
    # then decodes one by one and raises at the right record.
    for bit in range(16, len(good[0]) * 8):
        bad = bytearray(good[0])
        bad[bit // 8] ^= 1 << (bit % 8)
        assert decode_plain_many([good[1], bytes(bad), good[2]]) is None
    for cut in range(len(good[0])):
        assert decode_plain_many([good[1], good[0][:cut]]) is None
    two_values = wrap_plain(pack(1) + pack(2))  # sound checksum, two values in one record
    with pytest.raises(CorruptValueError):
        decode_plain(two_values)
    assert decode_plain_many([good[0], two_values]) is None
    assert decode_plain_many([good[0], b"\x01\x01" + good[0][2:]]) is None  # not plain


# -- crypto -------------------------------------------------------------------------------


def test_nonces_are_unique() -> None:
    cipher = Cipher(random_key())
    sealed = [cipher.seal(b"same plaintext", b"aad") for _ in range(20_000)]
    assert len({s[:24] for s in sealed}) == len(sealed)
    assert len(set(sealed)) == len(sealed)
    assert all(cipher.open(s, b"aad") == b"same plaintext" for s in sealed[:100])


def test_aad_binds_store_namespace_key_and_context() -> None:
    cipher = Cipher(random_key())
    aad = aad_for(b"store-1", "ns", "key", b"ctx")
    sealed = cipher.seal(b"payload", aad)
    assert cipher.open(sealed, aad) == b"payload"
    for other in (
        aad_for(b"store-2", "ns", "key", b"ctx"),
        aad_for(b"store-1", "ns2", "key", b"ctx"),
        aad_for(b"store-1", "ns", "key2", b"ctx"),
        aad_for(b"store-1", "ns", "key", b""),
        aad,
    ):
        if other == aad:
            continue
        with pytest.raises(IntegrityError):
            cipher.open(sealed, other)
    with pytest.raises(IntegrityError):
        Cipher(random_key()).open(sealed, aad)
    with pytest.raises(IntegrityError):
        cipher.open(sealed[:-1], aad)
    with pytest.raises(IntegrityError):
        cipher.open(b"", aad)


def test_aad_encoding_is_injective() -> None:
    pairs = [("ab", "c"), ("a", "bc"), ("a\x00", "c"), ("a", "\x00c"), ("", "abc"), ("abc", "")]
    encoded = {aad_for(b"s", ns, key) for ns, key in pairs}
    assert len(encoded) == len(pairs)
    assert aad_for(b"s", "\ud800x", "k") != aad_for(b"s", "x", "k")  # lone surrogates survive


def test_key_derivation() -> None:
    ops, mem = SECURITY_LEVELS["low"]
    salt = bytes(16)
    one = derive_kek("pw", salt, ops, mem)
    assert len(one) == KEY_SIZE
    assert derive_kek("pw", salt, ops, mem) == one
    assert derive_kek(b"pw", salt, ops, mem) == one
    assert derive_kek("pw", bytes([1]) * 16, ops, mem) != one
    assert derive_kek("pw2", salt, ops, mem) != one


def test_key_slot_wrap_and_unwrap() -> None:
    data_key = random_key()
    slot = new_slot(data_key, b"id", password="pw", raw_key=None, salt=None, security="low")
    assert slot.kdf == "argon2id" and len(slot.salt) == 16 and slot.security == "low"
    assert data_key not in slot.wrapped
    assert unwrap(slot, b"id", password="pw", raw_key=None) == data_key
    again = KeySlot.from_dict(unpack(pack(slot.to_dict())))
    assert unwrap(again, b"id", password="pw", raw_key=None) == data_key
    with pytest.raises(WrongPasswordError):
        unwrap(slot, b"id", password="wrong", raw_key=None)
    with pytest.raises(WrongPasswordError):
        unwrap(slot, b"other-id", password="pw", raw_key=None)
    with pytest.raises(WrongPasswordError):
        unwrap(slot, b"id", password=None, raw_key=None)
    other = new_slot(data_key, b"id", password="pw", raw_key=None, salt=None, security="low")
    assert other.salt != slot.salt and other.wrapped != slot.wrapped
    raw = new_slot(data_key, b"id", password=None, raw_key=b"k" * 32, salt=None, security="low")
    assert raw.kdf == "raw"
    assert unwrap(raw, b"id", password=None, raw_key=b"k" * 32) == data_key
    with pytest.raises(WrongPasswordError):
        unwrap(raw, b"id", password="pw", raw_key=None)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"password": "", "raw_key": None, "salt": None, "security": "low"},
        {"password": 5, "raw_key": None, "salt": None, "security": "low"},
        {"password": None, "raw_key": b"short", "salt": None, "security": "low"},
        {"password": None, "raw_key": None, "salt": None, "security": "low"},
        {"password": "pw", "raw_key": None, "salt": b"short", "security": "low"},
        {"password": "pw", "raw_key": None, "salt": None, "security": "ultra"},
    ],
)
def test_key_slot_bad_options(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidOptionError):
        new_slot(random_key(), b"id", **kwargs)


@pytest.mark.parametrize("garbage", [None, 1, {}, {"v": 2}, {"v": 1, "kdf": "x"}, []])
def test_damaged_key_slot(garbage: Any) -> None:
    with pytest.raises(StoreCorruptError):
        KeySlot.from_dict(garbage)


# -- URLs ---------------------------------------------------------------------------------


def test_parse_url_options_are_typed() -> None:
    parsed = parse_url(
        "memory://name/sub?namespace=x%20y&ttl=1.5&dot_names=yes&readonly=0&encrypt=auto&security=low",
        "memory",
    )
    assert parsed.scheme == "memory"
    assert parsed.netloc == "name" and parsed.path == "/sub"
    assert parsed.options == {
        "namespace": "x y",
        "ttl": 1.5,
        "dot_names": True,
        "readonly": False,
        "encrypt": None,
        "security": "low",
    }
    assert parse_url("MEMORY://", ("memory",)).scheme == "memory"
    assert parse_url("memory://a%2Fb", "memory").netloc == "a/b"


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///x.db",  # wrong scheme
        "memory:/x",  # no ://
        "memory://x#frag",
        "memory://x?bogus=1",
        "memory://x?ttl=1&ttl=2",
    ],
)
def test_parse_url_rejects(url: str) -> None:
    with pytest.raises(InvalidURLError):
        parse_url(url, "memory")


@pytest.mark.parametrize("query", ["ttl=soon", "dot_names=maybe", "readonly=2", "encrypt=perhaps"])
def test_parse_url_rejects_bad_option_values(query: str) -> None:
    with pytest.raises(InvalidOptionError):
        parse_url(f"memory://x?{query}", "memory")


def test_parse_url_rejects_non_str() -> None:
    with pytest.raises(InvalidURLError):
        parse_url(b"memory://", "memory")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["password", "PWD", "key", "salt", "token", "secret"])
def test_secrets_never_belong_in_a_url(name: str) -> None:
    with pytest.raises(InvalidURLError) as info:
        parse_url(f"memory://x?{name}=hunter2", "memory")
    assert "hunter2" not in str(info.value)


def test_unknown_option_lists_the_known_ones() -> None:
    with pytest.raises(InvalidURLError, match="namespace"):
        parse_url("memory://x?nope=1", "memory")
    extra = parse_url("sqlite:///x?synchronous=full", "sqlite", {"synchronous": str})
    assert extra.options == {"synchronous": "full"}


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///rel/path.db", "rel/path.db"),
        ("sqlite:////abs/path.db", "/abs/path.db"),
        ("sqlite:///data.db?ttl=5", "data.db"),
        ("sqlite://localhost/x.db", "x.db"),
        ("sqlite:///with%20space.db", "with space.db"),
    ],
)
def test_file_path(url: str, path: str) -> None:
    assert file_path(parse_url(url, "sqlite")) == path


@pytest.mark.parametrize("url", ["sqlite://data.db", "sqlite:///", "sqlite://"])
def test_file_path_rejects(url: str) -> None:
    with pytest.raises(InvalidURLError):
        file_path(parse_url(url, "sqlite"))


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("redis://user:hunter2@host:6379/0", "hunter2"),
        ("redis://:hunter2@host", "hunter2"),
        ("postgresql://u:hunter2@h/db?sslmode=require", "hunter2"),
        ("postgresql://u:p@ss%40w0rd@h/db", "ss%40w0rd"),  # an unescaped @ in the password
        ("redis://u:pa:ss@h/0", "pa:ss"),
        ("failed: redis://u:first@a/0 and rediss://v:second@b", "first"),
        ("failed: redis://u:first@a/0 and rediss://v:second@b", "second"),
    ],
)
def test_redact(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out
    assert "***" in out


def test_redact_keeps_what_is_not_a_secret() -> None:
    assert redact("redis://user@host:6379/0") == "redis://user@host:6379/0"
    assert redact("sqlite:///a:b@c.db") == "sqlite:///a:b@c.db"
    assert redact("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redact("no url at all") == "no url at all"


# -- registry -----------------------------------------------------------------------------


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register schemes without leaking them into the others."""
    monkeypatch.setattr("mappingstore._registry._SCHEMES", dict(_SCHEMES))


def test_unknown_scheme_names_the_known_ones() -> None:
    with pytest.raises(UnknownSchemeError) as info:
        mappingstore.open("nosuch://x")
    assert isinstance(info.value, ValueError)
    for scheme in ("memory", "sqlite", "redis", "postgresql"):
        assert scheme in str(info.value)
    assert "memory" in known_schemes() and known_schemes() == sorted(known_schemes())


@pytest.mark.parametrize("url", ["", "memory", "://x", "memory:/x"])
def test_open_rejects_non_urls(url: str) -> None:
    with pytest.raises(InvalidURLError):
        mappingstore.open(url)


def test_open_rejects_non_str() -> None:
    with pytest.raises(InvalidURLError):
        mappingstore.open(None)  # type: ignore[arg-type]


def test_open_default_and_case() -> None:
    with mappingstore.open() as store, mappingstore.open("MEMORY://") as other:
        assert isinstance(store, MemoryStore) and isinstance(other, MemoryStore)
        store["k"] = 1
        assert "k" not in other


def test_open_error_redacts_passwords() -> None:
    with pytest.raises(UnknownSchemeError) as info:
        mappingstore.open("nosuch://user:hunter2@host/0")
    assert "hunter2" not in str(info.value)


def test_register_scheme(scratch_registry: None) -> None:
    class Custom(MemoryStore):
        scheme = "custom"

    register_scheme("custom", Custom)
    assert "custom" in known_schemes()
    with mappingstore.open("custom://x") as store:
        assert type(store) is Custom
    with pytest.raises(InvalidURLError):
        register_scheme("custom", Custom)

    class Replacement(MemoryStore):
        scheme = "custom"

    register_scheme("custom", Replacement, replace=True)
    with mappingstore.open("CUSTOM://") as store:
        assert type(store) is Replacement
    register_scheme("by-path", "mappingstore._memory:MemoryStore")
    assert "by-path" in known_schemes()
    with pytest.raises(InvalidURLError):
        register_scheme("bad scheme!", Custom)


def test_scheme_whose_module_is_missing(scratch_registry: None) -> None:
    register_scheme("ghost", "mappingstore_no_such_module:Ghost")
    with pytest.raises(UnknownSchemeError, match="pip install"):
        mappingstore.open("ghost://x")


# -- errors -------------------------------------------------------------------------------

EXPECTED_BUILTINS: dict[str, type[BaseException]] = {
    "MissingKeyError": KeyError,
    "KeyTypeError": TypeError,
    "InvalidKeyError": ValueError,
    "NameConflictError": ValueError,
    "SerializationError": TypeError,
    "CorruptValueError": ValueError,
    "IntegrityError": ValueError,
    "WrongPasswordError": ValueError,
    "PasswordRequiredError": ValueError,
    "ReadOnlyError": TypeError,
    "StoreClosedError": ValueError,
    "InvalidOptionError": ValueError,
    "OptionTypeError": TypeError,
    "InvalidURLError": ValueError,
    "UnknownSchemeError": ValueError,
    "BackendError": OSError,
    "StoreCorruptError": OSError,
    "StoreNotFoundError": FileNotFoundError,
    "CapacityError": OSError,
    "BackendUnavailableError": OSError,
    "UnknownOutcomeError": OSError,
    "LockTimeoutError": TimeoutError,
}


@pytest.mark.parametrize("name", errors.__all__)
def test_every_error_subclasses_base_and_a_builtin(name: str) -> None:
    cls = getattr(errors, name)
    assert issubclass(cls, MappingStoreError)
    assert getattr(mappingstore, name) is cls  # exported at the top level too
    if cls is MappingStoreError:
        return
    builtin = [
        base
        for base in cls.__mro__
        if base.__module__ == "builtins" and base not in (Exception, BaseException, object)
    ]
    assert builtin, f"{name} subclasses no builtin exception a caller already catches"
    if name in EXPECTED_BUILTINS:
        assert issubclass(cls, EXPECTED_BUILTINS[name])
    assert cls.__doc__, f"{name} has no docstring"


def test_error_module_has_only_exported_exceptions() -> None:
    defined = {
        n
        for n, obj in vars(errors).items()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and obj.__module__ == errors.__name__
    }
    assert defined == set(errors.__all__)
    assert all(not hasattr(builtins, n) for n in defined)


def test_missing_key_error_looks_like_key_error() -> None:
    exc = errors.MissingKeyError("k")
    assert str(exc) == "'k'" == str(KeyError("k"))
    assert exc.args == ("k",)


# -- logging ------------------------------------------------------------------------------


def test_library_logger_has_only_a_null_handler() -> None:
    logger = logging.getLogger("mappingstore")
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)
    assert not [h for h in logger.handlers if not isinstance(h, logging.NullHandler)]


def test_no_password_in_debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mappingstore")
    password, new = "hunter2-original", "hunter2-renewed"
    name = "log-test"
    try:
        with MemoryStore(name, password=password, security="low") as store:
            store["k"] = "v"
            store.change_password(new, security="low")
        with (
            pytest.raises(WrongPasswordError),
            MemoryStore(name, password=password, security="low"),
        ):
            pass
        with MemoryStore(name, password=new, security="low") as store:
            assert store["k"] == "v"
            store.info()
            repr(store)
    finally:
        MemoryStore.drop(name)
    assert any(r.name.startswith("mappingstore") for r in caplog.records), "nothing was logged"
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + str(record.exc_text)
        assert password not in text and new not in text
