"""Store-wide commands: ``info``, ``namespaces``, ``check``, ``purge``, ``passwd``."""

from __future__ import annotations

from typing import Any

import click

from .._adapters import Prefixed
from .._store import Store
from .._url import redact
from ..errors import (
    CorruptValueError,
    IntegrityError,
    MissingKeyError,
    PasswordRequiredError,
    ReadOnlyError,
)
from . import _app, _kinds, _raw
from ._app import (
    Settings,
    UsageFailure,
    echo_json,
    open_store,
    read_secret,
    show_key,
    store_options,
)
from ._progress import Job

__all__ = ["COMMANDS"]

NEW_PASSWORD_ENV = "MAPPINGSTORE_NEW_PASSWORD"

_all_namespaces = click.option(
    "--all-namespaces",
    "-A",
    is_flag=True,
    help="Every namespace of the store, not only --namespace.",
)


@click.command("info")
@store_options
def info_cmd(settings: Settings) -> None:
    """Describe the store: backend, durability, item counts, encryption parameters.

    Never shows a secret, and needs no password (it decrypts nothing).
    """
    with open_store(settings, readonly=True, values=False) as store:
        info = store.info()
        namespaces = {ns: _raw.count(store, ns) for ns in store.namespaces()}
        items = _raw.count(store, store.namespace)
    # Options of this particular open say nothing about the store itself.
    for name in ("readonly", "encrypt_by_default", "dot_names"):
        info.pop(name, None)
    info["url"] = redact(str(info.get("url", "")))
    info["encrypted"] = info.get("encryption") is not None
    info["items"] = items
    info["namespaces"] = namespaces
    if settings.json:
        echo_json(info, settings)
        return
    crypto = info.pop("encryption")
    rows: list[tuple[str, str]] = [
        (k, _text(v)) for k, v in info.items() if k not in ("namespaces", "encrypted")
    ]
    rows.append(
        (
            "namespaces",
            ", ".join(f"{show_key(ns)} ({n})" for ns, n in namespaces.items()) or "(none)",
        )
    )
    rows.append(("encryption", _crypto_text(crypto)))
    width = max(len(k) for k, _ in rows) + 1
    for key, text in rows:
        click.echo(f"{key + ':':<{width}} {text}")


def _crypto_text(crypto: dict[str, Any] | None) -> str:
    if crypto is None:
        return "none"
    text = f"{crypto['cipher']}, key from {crypto['kdf']}"
    if crypto["kdf"] == "argon2id":
        text += (
            f" (security {crypto['security']}: opslimit {crypto['opslimit']}, "
            f"memlimit {crypto['memlimit']:,} bytes)"
        )
    return text


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


@click.command("namespaces")
@store_options
def namespaces_cmd(settings: Settings) -> None:
    """List the namespaces that hold data."""
    with open_store(settings, readonly=True, values=False) as store:
        names = store.namespaces()
    if settings.json:
        echo_json(names, settings)
    else:
        for name in names:
            click.echo(show_key(name))


@click.command("check")
@_all_namespaces
@store_options
def check_cmd(settings: Settings, all_namespaces: bool) -> None:
    """Verify that every record decodes and authenticates: items, and every record of
    each time series, event log and blob.

    Plain records are checked against their CRC, encrypted ones against their AEAD tag
    (so an encrypted store needs its password). Each bad item, series, event log or blob
    is listed on stdout and the exit status is 1; nothing is repaired or deleted.
    """
    bad: list[dict[str, str]] = []
    counts = {kind: 0 for kind, *_ in _kinds.KINDS}
    with open_store(settings, readonly=True, dot_names=False) as store:
        spaces = store.namespaces() if all_namespaces else [store.namespace]
        # A store works in one namespace: the series, event logs and blobs of the others
        # are read through more instances of the same URL, with the same password.
        stores = _kinds.Instances(
            store,
            lambda ns: open_store(
                settings,
                readonly=True,
                dot_names=False,
                namespace=ns,
                password=settings.unlocked.get(settings.url),
            ),
        )
        try:
            # (kind, key prefix, name): the store's own objects (key prefix ""), then the
            # series and event logs written through a key prefix, which its listings omit.
            plan = [
                (
                    ns,
                    [
                        *(
                            (kind, "", name)
                            for kind, *_ in _kinds.KINDS
                            for name in _kinds.names(stores.get(ns), kind)
                        ),
                        *(
                            (kind, key_prefix, name)
                            for kind, *_ in _kinds.KINDS
                            for key_prefix, found in _kinds.prefixed_names(
                                stores.get(ns), kind
                            ).items()
                            for name in found
                        ),
                    ],
                )
                for ns in spaces
            ]
            total = sum(_raw.count(store, ns) + len(objects) for ns, objects in plan)
            with Job(settings, "check", total=total) as job:
                for ns, objects in plan:
                    _check_items(store, ns, job, bad)
                    for kind, key_prefix, name in objects:
                        try:
                            ns_store = stores.get(ns)
                            if key_prefix:
                                with Prefixed(ns_store, key_prefix) as view:
                                    _kinds.check_object(view, kind, name)
                            else:
                                _kinds.check_object(ns_store, kind, name)
                        except MissingKeyError:
                            pass  # a blob deleted since it was listed
                        except _kinds.DAMAGE as exc:
                            bad.append(
                                {
                                    "namespace": ns,
                                    "kind": kind,
                                    "key": key_prefix + name,
                                    "error": str(exc),
                                }
                            )
                        counts[kind] += 1
                        job.add(0, progress=1)
                shown = [
                    f"{counts[kind]:,} {one if counts[kind] == 1 else many}"
                    for kind, one, many, _ in _kinds.KINDS
                    if counts[kind]
                ]
                stats = job.summary("checked", ", ".join([*shown, f"{len(bad)} bad"]))
        finally:
            stores.close()
    if settings.json:
        echo_json({**stats, **counts, "ok": not bad, "bad": bad}, settings)
    else:
        labels = {kind: one for kind, one, _, _ in _kinds.KINDS}
        for item in bad:
            where = f"[{show_key(item['namespace'])}] " if all_namespaces else ""
            what = f"{labels[item['kind']]} " if item["kind"] in labels else ""
            click.echo(f"BAD {where}{what}{show_key(item['key'])}: {item['error']}")
    if bad:
        raise click.exceptions.Exit(1)


def _check_items(store: Store, ns: str, job: Job, bad: list[dict[str, str]]) -> None:
    for key in _raw.keys(store, ns):
        rec = _raw.record(store, ns, key)
        if rec is None:  # deleted or expired since it was listed
            continue
        try:
            _raw.decode(store, ns, key, rec[0])
        except (CorruptValueError, IntegrityError, PasswordRequiredError) as exc:
            bad.append({"namespace": ns, "kind": "item", "key": key, "error": str(exc)})
        job.add(1, len(rec[0]))


@click.command("purge")
@_all_namespaces
@store_options
def purge_cmd(settings: Settings, all_namespaces: bool) -> None:
    """Physically remove expired items (they are already invisible) to reclaim space."""
    with open_store(settings, readonly=False, values=False) as store:
        spaces = store.namespaces() if all_namespaces else [store.namespace]
        with Job(settings, "purge", total=len(spaces), unit="namespace") as job:
            for ns in spaces:
                job.add(_raw.purge(store, ns), progress=1)
            stats = job.summary("purged", what="expired item", show_bytes=False)
    if settings.json:
        echo_json(stats, settings)


def _new_password(settings: Settings, path: str | None) -> str:
    secret = read_secret(settings, path, NEW_PASSWORD_ENV)
    if secret is not None:
        return secret
    if not _app._interactive():
        raise UsageFailure(f"give the new password with --new-password-file or ${NEW_PASSWORD_ENV}")
    secret = click.prompt(
        "New password", hide_input=True, confirmation_prompt="Repeat the new password", err=True
    )
    settings.secrets.append(secret)
    return secret


def _refuse_readonly(store: Store, outcome: str) -> None:
    if store.readonly:
        raise ReadOnlyError(f"{redact(store.url)} was opened read-only: {outcome}")


@click.command("passwd")
@click.option(
    "--new-password-file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    default=None,
    help=f"Read the new password from this file (else ${NEW_PASSWORD_ENV}, else prompt twice).",
)
@store_options
def passwd_cmd(settings: Settings, new_password_file: str | None) -> None:
    """Change the store's password (O(1): one key is re-wrapped, no value is rewritten).

    The current password comes from --password-file, $MAPPINGSTORE_PASSWORD or a
    prompt. --security sets the argon2id cost of the new password. On a store without
    encryption this sets a first password: new values are encrypted from then on, and
    existing values stay readable as they are (copy them to re-encrypt everything).
    The password protects every namespace of the store.
    """
    with open_store(settings, readonly=True, values=False) as probe:
        crypto = probe.info().get("encryption")
    if crypto is None:
        # Opening a writable store with a password is what creates its key slot; opened
        # read-only (?readonly=true in the URL) it creates none, without complaint.
        with open_store(settings, readonly=False, values=False) as plain:
            _refuse_readonly(plain, "no password was set")
        new = _new_password(settings, new_password_file)
        with open_store(settings, readonly=False, dot_names=False, password=new) as store:
            _refuse_readonly(store, "no password was set")
            where = redact(store.url)
        if not settings.quiet:
            click.echo(f"encryption enabled for {where}: new values will be encrypted", err=True)
        return
    with open_store(settings, readonly=False, dot_names=False) as store:
        _refuse_readonly(store, "the password was not changed")
        new = _new_password(settings, new_password_file)
        # Keep the current argon2id cost unless --security asks for another one.
        store.change_password(new, security=settings.security or crypto.get("security"))
    if not settings.quiet:
        click.echo("password changed", err=True)


COMMANDS = [info_cmd, namespaces_cmd, check_cmd, purge_cmd, passwd_cmd]
