"""Moving data: ``export``, ``import`` and ``copy``.

All three work on raw key names (``--dot-names`` does not apply), carry each item's
expiry, and keep every value type exact through typed JSON or a decode/re-encode.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterator, Sequence
from typing import IO, Any

import click

from .._adapters import Prefixed
from .._codec import is_encrypted
from .._jsonio import from_typed, to_plain, to_typed
from .._keys import check_key, check_namespace
from .._store import Record, Store
from .._url import redact
from ..errors import (
    CorruptValueError,
    IntegrityError,
    MappingStoreError,
    PasswordRequiredError,
    StoreNotFoundError,
)
from . import _kinds, _raw
from ._app import (
    CLIError,
    DeepJSONError,
    Settings,
    UsageFailure,
    binary_stdout,
    dumps,
    echo_json,
    iter_chunks,
    loads,
    open_store,
    show_key,
    store_options,
    store_options_no_url,
)
from ._kinds import same_value
from ._progress import Job, human_bytes

__all__ = ["COMMANDS", "same_value"]

DST_PASSWORD_ENV = "MAPPINGSTORE_DST_PASSWORD"
_EXPORT_BATCH = 1000  # records read per round (see _raw.RecordReader)
_BATCH = click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    metavar="N",
    default=1000,
    show_default=True,
    help="Items written per transaction.",
)
_all_namespaces = click.option(
    "--all-namespaces",
    "-A",
    is_flag=True,
    help="Every namespace of the store, not only --namespace.",
)


# -- export ---------------------------------------------------------------------------------


#: The directory of a process's open descriptors, where /dev/fd and /dev/stdout lead.
_FD_DIR = re.compile(r"/proc/(?:self|thread-self|\d+)(?:/task/\d+)?/fd")
_MAX_LINKS = 40  # as the kernel's limit on symbolic links followed in one lookup


def _descriptor(path: str) -> int | None:
    """The descriptor of this process that *path* names (``/dev/fd/N``, ``/dev/stdout``,
    ``/proc/self/fd/N``, or a symbolic link to one of them), else ``None``."""
    p = os.path.abspath(path)
    for _ in range(_MAX_LINKS):
        parent = os.path.realpath(os.path.dirname(p))
        name = os.path.basename(p)
        if _FD_DIR.fullmatch(parent) is not None:
            pid = parent.split("/")[2]
            mine = pid in ("self", "thread-self") or pid == str(os.getpid())
            return int(name) if mine and name.isdigit() else None
        p = os.path.join(parent, name)
        if not os.path.islink(p):
            return None
        p = os.path.join(parent, os.readlink(p))  # a relative target is relative to parent
    return None


@contextlib.contextmanager
def _output(path: str) -> Iterator[IO[bytes]]:
    """Where ``export`` writes: stdout for '-'; a regular file (new or existing) through a
    temporary file renamed over it only when complete; anything else directly.

    A symbolic link is followed: the file it points to is replaced, the link stays. A
    descriptor path (``/dev/fd/N`` of a process substitution, ``/dev/stdout``) is written
    through a duplicate of that descriptor, as ``>`` or ``>>`` opened it. A FIFO, a
    terminal or another device is opened and written in place: renaming a file over it
    would replace it, and its reader would get nothing.
    """
    if path == "-":
        yield binary_stdout()
        return
    fd = _descriptor(path)
    if fd is not None:
        with os.fdopen(os.dup(fd), "wb") as fp:
            yield fp
        return
    target = os.path.realpath(path)  # a symbolic link's file, not the link
    try:
        regular = stat.S_ISREG(os.stat(target).st_mode)
    except FileNotFoundError:
        regular = True  # a new file
    if not regular:
        with open(target, "wb") as fp:
            yield fp
        return
    fd, tmp = tempfile.mkstemp(prefix=".mappingstore-export-", dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "wb") as fp:
            yield fp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _line(obj: Any) -> bytes:
    return dumps(obj).encode("utf-8") + b"\n"


@click.command("export")
@click.argument(
    "output", default="-", type=click.Path(dir_okay=False, allow_dash=True), metavar="[FILE]"
)
@click.option("--prefix", default="", metavar="PREFIX", help="Only keys starting with PREFIX.")
@click.option(
    "--plain",
    is_flag=True,
    help="Plain JSON any tool reads (lossy: bytes, tuples, datetimes... do not come back exactly).",
)
@_all_namespaces
@store_options
def export_cmd(
    settings: Settings, output: str, prefix: str, plain: bool, all_namespaces: bool
) -> None:
    """Write the items to FILE (default '-': stdout) as JSON Lines, sorted by key.

    Each line is {"key": ..., "value": <typed JSON>}, plus "expires" (epoch seconds)
    for an item with a TTL and "namespace" with --all-namespaces. With --json the
    output is one object {key: value}, the format of Store.export_json(). Typed JSON
    restores every value exactly with 'import'. A file is created readable by its owner
    only (it holds decrypted values), under a temporary name renamed when complete (over
    the target of a symbolic link); a FIFO, a device or a /dev/fd path is written directly.
    """
    if settings.json and all_namespaces:
        raise UsageFailure("--json writes one namespace; use JSON Lines for --all-namespaces")
    convert = to_plain if plain else to_typed
    with open_store(settings, readonly=True, dot_names=False) as store:
        spaces = store.namespaces() if all_namespaces else [store.namespace]
        plan = [(ns, sorted(_raw.keys(store, ns, prefix))) for ns in spaces]
        with (
            Job(settings, "export", total=sum(len(names) for _, names in plan)) as job,
            _raw.RecordReader(store) as reader,
            _output(output) as out,
        ):
            first = True
            if settings.json:
                out.write(b"{")
            for ns, names in plan:
                for batch in iter_chunks(iter(names), _EXPORT_BATCH):
                    for name, rec in zip(batch, reader.read(ns, batch), strict=True):
                        if rec is None:  # deleted or expired since it was listed
                            job.add(0, progress=1)
                            continue
                        value = convert(_raw.decode(store, ns, name, rec[0]))
                        if settings.json:
                            text = f"{dumps(name)}: {dumps(value)}".encode()
                            chunk = text if first else b", " + text
                            first = False
                        else:
                            obj: dict[str, Any] = {"key": name, "value": value}
                            if rec[1] is not None:
                                obj["expires"] = rec[1]
                            if all_namespaces:
                                obj["namespace"] = ns
                            chunk = _line(obj)
                        out.write(chunk)
                        job.add(1, len(chunk))
            if settings.json:
                out.write(b"}\n")
            out.flush()
    job.summary("exported")


# -- import ---------------------------------------------------------------------------------


class _BadInput(Exception):
    pass


def _parse_line(line: bytes, default_ns: str) -> tuple[str, str, Any, float | None]:
    try:
        obj = loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _BadInput(f"not valid JSON: {exc}") from None
    except DeepJSONError as exc:
        raise _BadInput(str(exc)) from None
    if not isinstance(obj, dict):
        raise _BadInput('expected an object {"key": ..., "value": ...}')
    unknown = set(obj) - {"key", "value", "expires", "namespace"}
    if unknown or "key" not in obj or "value" not in obj:
        raise _BadInput(
            'expected an object with "key" and "value" (and optionally "expires", "namespace"); '
            f"got fields {sorted(obj)}"
        )
    try:
        key = check_key(obj["key"])
        ns = check_namespace(obj["namespace"]) if "namespace" in obj else default_ns
        value = from_typed(obj["value"])
    except RecursionError:
        raise _BadInput("the value is nested too deeply") from None
    except (MappingStoreError, ValueError, TypeError, KeyError, IndexError, ArithmeticError) as exc:
        raise _BadInput(str(exc)) from None
    return ns, key, value, _expires(obj.get("expires"))


def _expires(given: Any) -> float | None:
    """The expiry of an imported item: ``None`` (no expiry) or a finite epoch time.

    A time in the past (zero and negative ones included) is valid and means the item has
    expired: it is skipped. Infinity and NaN are not times; no export writes them (an
    item without expiry has no "expires"), and no backend can store them.
    """
    if given is None:
        return None
    bad = '"expires" must be a finite number (epoch seconds) or null, got '
    if isinstance(given, bool) or not isinstance(given, (int, float)):
        raise _BadInput(bad + type(given).__name__)
    try:
        expires = float(given)
    except OverflowError:  # an int beyond any float
        raise _BadInput(bad + "a number beyond any float") from None
    if not math.isfinite(expires):
        raise _BadInput(bad + repr(expires))
    return expires


def _input_size(fp: IO[bytes]) -> int | None:
    try:
        st = os.fstat(fp.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


_Row = tuple[int, "bytes | None", tuple[str, str, Any, "float | None"]]


@click.command("import")
@click.argument("source", default="-", type=click.File("rb"), metavar="[FILE]")
@_BATCH
@store_options
def import_cmd(settings: Settings, source: IO[bytes], batch_size: int) -> None:
    """Read items from FILE (default '-': stdin) written by 'export' and store them.

    JSON Lines by default; with --json one object {key: value}. Existing keys are
    overwritten. "expires" is a finite epoch time: items whose "expires" has passed are
    skipped; items without one get the store's default TTL, if any. Writes commit in
    batches: if a line is bad, the batches before it stay imported and the error names
    the line.
    """
    with open_store(settings, readonly=False, dot_names=False) as store:
        default_ns = store.namespace
        rows: Iterator[_Row]
        total: int | None
        if settings.json:
            items = _load_object(source)
            rows = ((0, None, (default_ns, check_key(k), v, None)) for k, v in items.items())
            total, unit = len(items), "item"
        else:
            rows = _lines(source, default_ns)
            total, unit = _input_size(source), "B"
        with Job(settings, "import", total=total, unit=unit) as job:
            try:
                expired = _import_rows(store, job, rows, batch_size, by_bytes=unit == "B")
            except CorruptValueError as exc:
                raise CorruptValueError(f"{exc} ({job.items:,} items imported before it)") from None
            job.summary("imported", f"{expired:,} expired skipped" if expired else "")


def _load_object(source: IO[bytes]) -> dict[str, Any]:
    """The items of one JSON object ``{key: typed value}`` (``import --json``)."""
    try:
        obj = loads(source.read())
        if not isinstance(obj, dict):
            raise ValueError("expected a JSON object {name: value}")
        return {k: from_typed(v) for k, v in obj.items()}
    except (ValueError, TypeError, KeyError, IndexError, ArithmeticError, RecursionError) as exc:
        # DeepJSONError and JSONDecodeError are ValueErrors.
        raise CorruptValueError(f"not valid mappingstore JSON: {exc}") from None


def _import_rows(
    store: Store, job: Job, rows: Iterator[_Row], batch_size: int, *, by_bytes: bool
) -> int:
    expired = 0
    for chunk in iter_chunks(rows, batch_size):
        now = _raw.now(store)
        ops = []
        for _, raw_line, (ns, key, value, expires) in chunk:
            step = (len(raw_line) if raw_line is not None else 0) if by_bytes else 1
            if expires is not None and expires <= now:
                expired += 1
                job.add(0, progress=step)
                continue
            data = _raw.encode(store, ns, key, value)
            ops.append(
                (ns, key, data, expires if expires is not None else _raw.default_expires(store))
            )
            job.add(1, len(data), progress=step)
        _raw.write(store, ops)
    return expired


def _lines(fp: IO[bytes], default_ns: str) -> Iterator[_Row]:
    for number, line in enumerate(fp, 1):
        if not line.strip():
            continue
        try:
            yield number, line, _parse_line(line, default_ns)
        except _BadInput as exc:
            raise CorruptValueError(f"line {number}: {exc}") from None


# -- copy -----------------------------------------------------------------------------------


def _destination_options(
    url: str, namespace: str | None, password_file: str | None, password: str | None = None
) -> dict[str, Any]:
    return {
        "url": url,
        "namespace": namespace,
        "dot_names": False,
        "password_file": password_file,
        "password_env": DST_PASSWORD_ENV,
        "password": password,
        "file_option": "--dst-password-file",
        "label": "the destination ",
    }


def _open_destination(
    settings: Settings, url: str, namespace: str | None, password_file: str | None, dry_run: bool
) -> Store | None:
    kwargs = _destination_options(url, namespace, password_file)
    if not dry_run:
        return open_store(settings, readonly=False, **kwargs)
    try:
        return open_store(settings, readonly=True, **kwargs)
    except StoreNotFoundError:
        return None  # a dry run creates nothing; a missing destination is empty


@click.command("copy")
@click.argument("src_url", metavar="SRC_URL")
@click.argument("dst_url", metavar="DST_URL")
@click.option(
    "--src-namespace",
    metavar="NAME",
    default=None,
    help="Namespace to read (default: --namespace, else default).",
)
@click.option(
    "--dst-namespace",
    metavar="NAME",
    default=None,
    help="Namespace to write (default: --namespace, else default).",
)
@_all_namespaces
@click.option(
    "--prefix",
    default="",
    metavar="PREFIX",
    help="Only keys (and series, event log, blob names) starting with PREFIX.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace destination items, series, event logs and blobs that hold other content.",
)
@click.option("--dry-run", is_flag=True, help="Count what would be copied; write nothing.")
@click.option(
    "--dst-password-file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    default=None,
    help=f"Destination password (else ${DST_PASSWORD_ENV}, else a prompt if it is encrypted).",
)
@click.option(
    "--allow-plaintext",
    is_flag=True,
    help="Let encrypted data of the source be stored unencrypted (destination without password).",
)
@_BATCH
@store_options_no_url
def copy_cmd(
    settings: Settings,
    src_url: str,
    dst_url: str,
    src_namespace: str | None,
    dst_namespace: str | None,
    all_namespaces: bool,
    prefix: str,
    overwrite: bool,
    dry_run: bool,
    dst_password_file: str | None,
    allow_plaintext: bool,
    batch_size: int,
) -> None:
    """Copy everything from SRC_URL to DST_URL (any two backends): every item with its
    expiry, every time series, event log and blob.

    \b
      mappingstore copy sqlite:///old.db redis://localhost/0
      MAPPINGSTORE_DST_PASSWORD=... mappingstore copy sqlite:///plain.db sqlite:///secret.db
      mappingstore copy --src-namespace a --dst-namespace b sqlite:///x.db sqlite:///x.db

    The source's password comes from --password-file or $MAPPINGSTORE_PASSWORD, the
    destination's from --dst-password-file or $MAPPINGSTORE_DST_PASSWORD: copying
    from a plain store to an encrypted one, or between two passwords, re-encrypts every
    value. --security sets the cost of a new destination password.

    Resumable: an item, series, event log or blob already present in the destination
    with the same content is skipped (a series holding the first points of the
    source's is completed). One holding other content is never overwritten or merged
    into without --overwrite (which replaces it whole): it is reported, the rest is
    copied, and the exit status is 1. Item writes commit in batches of --batch-size.
    """
    if all_namespaces and (src_namespace or dst_namespace):
        raise UsageFailure(
            "--all-namespaces copies each namespace to itself; drop --src/--dst-namespace"
        )
    src = open_store(
        settings,
        url=src_url,
        namespace=src_namespace,
        readonly=True,
        dot_names=False,
        label="the source ",
    )
    with src:
        dst = _open_destination(settings, dst_url, dst_namespace, dst_password_file, dry_run)
        with dst if dst is not None else contextlib.nullcontext():
            spaces = src.namespaces() if all_namespaces else [src.namespace]
            if dst is not None:
                target = dst.namespace
            else:
                target = dst_namespace or settings.namespace or "default"
            pairs = [(ns, ns if all_namespaces else target) for ns in spaces]
            if dst is not None and dst.url == src.url and src.url != "memory://":
                clash = [s for s, d in pairs if s == d]
                if clash:
                    raise UsageFailure(
                        "source and destination are the same store and namespace "
                        f"({show_key(clash[0])})"
                    )
            options = {
                "overwrite": overwrite,
                "dry_run": dry_run,
                "allow_plaintext": allow_plaintext,
                "batch_size": batch_size,
            }
            # A store works in one namespace: series, event logs and blobs of the others
            # are reached through more instances of the same URLs, with the same password.
            srcs = _kinds.Instances(
                src,
                lambda ns: open_store(
                    settings,
                    url=src_url,
                    namespace=ns,
                    readonly=True,
                    dot_names=False,
                    password=settings.unlocked.get(src_url),
                    label="the source ",
                ),
            )
            dsts = None
            if dst is not None:
                dsts = _kinds.Instances(
                    dst,
                    lambda ns: open_store(
                        settings,
                        readonly=dry_run,
                        **_destination_options(
                            dst_url, ns, dst_password_file, settings.unlocked.get(dst_url)
                        ),
                    ),
                )
            try:
                result = _copy(settings, srcs, dsts, pairs, prefix, options)
            finally:
                srcs.close()
                if dsts is not None:
                    dsts.close()
    conflicts: list[str] = result.pop("conflicts")
    if settings.json:
        echo_json({**result, "conflicts": conflicts}, settings)
    others = [(kind, result[kind]["conflicts"]) for kind, *_ in _kinds.KINDS]
    if conflicts and not any(found for _, found in others):
        shown = ", ".join(repr(k) for k in conflicts[:10]) + (
            ", ..." if len(conflicts) > 10 else ""
        )
        raise CLIError(
            f"{len(conflicts)} item(s) already hold a different value in {redact(dst_url)} "
            f"and were not overwritten ({shown}); rerun with --overwrite to replace them"
        )
    if conflicts or any(found for _, found in others):
        counts = [f"{len(conflicts)} item(s)"] if conflicts else []
        labelled = [repr(k) for k in conflicts]
        for (_, one, many, _), (_, found) in zip(_kinds.KINDS, others, strict=True):
            if found:
                counts.append(f"{len(found)} {one if len(found) == 1 else many}")
                labelled += [f"{one} {name!r}" for name in found]
        shown = ", ".join(labelled[:10]) + (", ..." if len(labelled) > 10 else "")
        raise CLIError(
            f"{', '.join(counts)} already hold other content in {redact(dst_url)} and were "
            f"not overwritten ({shown}); rerun with --overwrite to replace them"
        )


class _Copier:
    """Decides, item by item, what ``copy`` writes; counts what it skips."""

    def __init__(
        self, src: Store, dst: Store | None, *, overwrite: bool, allow_plaintext: bool
    ) -> None:
        self.src, self.dst = src, dst
        self.overwrite, self.allow_plaintext = overwrite, allow_plaintext
        self.present = 0
        self.conflicts: list[str] = []

    def op(
        self, sns: str, dns: str, name: str, rec: Record, old: bytes | None
    ) -> tuple[str, str, bytes, float | None] | None:
        """The write that copies *rec* to ``(dns, name)``, or ``None`` to skip it."""
        src, dst = self.src, self.dst
        data, expires = rec
        value = _raw.decode(src, sns, name, data)
        if old is not None and dst is not None:
            try:
                equal = same_value(value, _raw.decode(dst, dns, name, old))
            except (CorruptValueError, IntegrityError):
                equal = False  # a damaged destination item is a different value
            if equal:
                self.present += 1
                return None
            if not self.overwrite:
                self.conflicts.append(name)
                return None
        if dst is None:  # a dry run whose destination does not exist: all would be copied
            return (dns, name, data, expires)
        encrypt = None
        if is_encrypted(data) and not dst.encrypted and not self.allow_plaintext:
            encrypt = True  # never decrypt an encrypted item into plaintext silently
        try:
            return (dns, name, _raw.encode(dst, dns, name, value, encrypt), expires)
        except PasswordRequiredError:
            raise PasswordRequiredError(
                f"{name!r} is encrypted in the source but the destination has no "
                f"password: set ${DST_PASSWORD_ENV} or --dst-password-file, "
                "or pass --allow-plaintext"
            ) from None


@contextlib.contextmanager
def _prefixed(store: Store | None, key_prefix: str) -> Iterator[Store | None]:
    """*store* seen through *key_prefix* (``None`` stays ``None``); the store stays open."""
    if store is None:
        yield None
        return
    view = Prefixed(store, key_prefix)
    try:
        yield view
    finally:
        view.close()


def _check_plaintext(
    src: Store,
    dst: Store | None,
    plan: list[Any],
    allow_plaintext: bool,
    more: Sequence[tuple[str, str]] = (),
) -> None:
    """Refuse to store the series, event logs and blobs of an encrypted source unencrypted.

    Items are judged one by one (each record says whether it is encrypted); these are
    judged by the source store: when it holds a key (a password, even if ``encrypt=false``
    turned its default encryption off), they count as encrypted. They are written with the
    destination's own encryption, so a destination that does not encrypt by default would
    store them in plaintext: that takes --allow-plaintext.
    """
    if dst is None or allow_plaintext or src._cipher is None or dst.encrypted:
        return
    found = [
        (one, name)
        for _, _, _, objects in plan
        for (kind, one, _, _) in _kinds.KINDS
        for name in objects[kind]
    ]
    found += more
    if found:
        one, name = found[0]
        raise PasswordRequiredError(
            "the source is encrypted but the destination does not encrypt (no password, "
            f"or encrypt=false), so its {one} "
            f"{name!r} would be stored unencrypted: set ${DST_PASSWORD_ENV} or "
            "--dst-password-file, or pass --allow-plaintext"
        )


def _copy(
    settings: Settings,
    srcs: _kinds.Instances,
    dsts: _kinds.Instances | None,
    pairs: list[tuple[str, str]],
    prefix: str,
    options: dict[str, Any],
) -> dict[str, Any]:
    dry_run = bool(options["dry_run"])
    src = srcs.base
    dst = dsts.base if dsts is not None else None
    copier = _Copier(
        src, dst, overwrite=options["overwrite"], allow_plaintext=options["allow_plaintext"]
    )
    plan = [
        (
            s,
            d,
            list(_raw.keys(src, s, prefix)),
            {kind: _kinds.names(srcs.get(s), kind, prefix) for kind, *_ in _kinds.KINDS},
        )
        for s, d in pairs
    ]
    # Series and event logs written through a key prefix (Prefixed, ?key_prefix=), which
    # the store's own listings never show: found by their records, copied through the
    # same prefix on both sides.
    under = [
        {kind: _kinds.prefixed_names(srcs.get(s), kind, prefix) for kind, *_ in _kinds.KINDS}
        for s, _ in pairs
    ]
    _check_plaintext(
        src,
        dst,
        plan,
        options["allow_plaintext"],
        [
            (one, key_prefix + name)
            for found in under
            for (kind, one, _, _) in _kinds.KINDS
            for key_prefix, names in found[kind].items()
            for name in names
        ],
    )
    tallies = {kind: _kinds.Tally() for kind, *_ in _kinds.KINDS}
    names_held: dict[tuple[str, str], set[str]] = {}
    total = sum(len(names) + sum(map(len, objects.values())) for _, _, names, objects in plan)
    total += sum(len(n) for found in under for by in found.values() for n in by.values())
    with Job(settings, "copy", total=total) as job, _raw.RecordReader(src) as reader:

        def copy_all(
            kind: str, source: Store, target: Store | None, found: list[str], held: set[str]
        ) -> None:
            for name in found:
                _kinds.copy_object(
                    kind,
                    source,
                    target,
                    name,
                    tallies[kind],
                    held=held,
                    overwrite=options["overwrite"],
                    dry=dry_run,
                )
                job.add(0, progress=1)

        for (sns, dns, names, objects), prefixed in zip(plan, under, strict=True):
            for chunk in iter_chunks(iter(names), options["batch_size"]):
                existing = _raw.datas(dst, dns, chunk) if dst is not None else [None] * len(chunk)
                records = reader.read(sns, chunk)
                now = _raw.now(src)
                ops = []
                for name, rec, old in zip(chunk, records, existing, strict=True):
                    if rec is None or (rec[1] is not None and rec[1] <= now):
                        continue  # deleted or expired since it was listed
                    op = copier.op(sns, dns, name, rec, old)
                    if op is not None:
                        ops.append(op)
                if not dry_run and dst is not None:
                    _raw.write(dst, ops)
                job.add(len(ops), sum(len(op[2]) for op in ops), progress=len(chunk))
            for kind, found in objects.items():
                if not found:
                    continue
                target = dsts.get(dns) if dsts is not None else None
                # The destination's names of this kind, listed once per namespace and kept
                # up to date by copy_object: a listing per object made copy quadratic.
                held = names_held.get((dns, kind))
                if held is None:
                    listed = _kinds.names(target, kind, prefix) if target is not None else []
                    held = names_held[dns, kind] = set(listed)
                copy_all(kind, srcs.get(sns), target, found, held)
            for kind, by_prefix in prefixed.items():
                target = dsts.get(dns) if dsts is not None else None
                for key_prefix, found in by_prefix.items():
                    with (
                        Prefixed(srcs.get(sns), key_prefix) as psrc,
                        _prefixed(target, key_prefix) as pdst,
                    ):
                        held = set(_kinds.names(pdst, kind)) if pdst is not None else set()
                        copy_all(kind, psrc, pdst, found, held)
    shown = []
    for kind, one, many, unit in _kinds.KINDS:
        if any(objects[kind] for _, _, _, objects in plan) or any(f[kind] for f in under):
            t = tallies[kind]
            size = (
                human_bytes(t.units)
                if unit == "byte"
                else f"{t.units:,} {unit}{'' if t.units == 1 else 's'}"
            )
            shown.append(f"{t.copied:,} {one if t.copied == 1 else many} ({size})")
    present = copier.present + sum(t.present for t in tallies.values())
    conflicting = len(copier.conflicts) + sum(len(t.conflicts) for t in tallies.values())
    details = ", ".join([*shown, f"{present:,} already present, {conflicting:,} conflicting"])
    stats = job.summary("would copy" if dry_run else "copied", details)
    return {
        **stats,
        "present": copier.present,
        "conflicts": copier.conflicts,
        "dry_run": dry_run,
        **{kind: tallies[kind].as_json(unit) for kind, _, _, unit in _kinds.KINDS},
    }


COMMANDS = [export_cmd, import_cmd, copy_cmd]
