"""Every exception mappingstore raises.

Each class subclasses :class:`MappingStoreError` *and* the builtin exception a caller
already catches, so ``except KeyError`` keeps working for a missing key and
``except MappingStoreError`` catches everything the library raises on purpose.
Driver exceptions (``sqlite3``, ``redis``, ``psycopg``, ``msgpack``, ``nacl``) are
converted once, at the boundary, and chained with ``raise ... from``.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendUnavailableError",
    "BatchConflictError",
    "CapacityError",
    "CorruptValueError",
    "EventConflictError",
    "InsecureStorageError",
    "IntegrityError",
    "InvalidKeyError",
    "InvalidOptionError",
    "InvalidURLError",
    "KeyTypeError",
    "LockTimeoutError",
    "MappingStoreError",
    "MissingFrequencyError",
    "MissingKeyError",
    "NameConflictError",
    "OptionTypeError",
    "PasswordRequiredError",
    "ReadOnlyError",
    "ReplayError",
    "SerializationError",
    "StoreClosedError",
    "StoreCorruptError",
    "StoreNotFoundError",
    "UnknownOutcomeError",
    "UnknownSchemeError",
    "WrongPasswordError",
]


class MappingStoreError(Exception):
    """Base class of every error raised by mappingstore."""


# -- keys -----------------------------------------------------------------------------------


class MissingKeyError(MappingStoreError, KeyError):
    """The key is not in the store (or has expired)."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep that behaviour.
        return KeyError.__str__(self)


class KeyTypeError(MappingStoreError, TypeError):
    """A key is not a ``str``. Keys are never coerced."""


class InvalidKeyError(MappingStoreError, ValueError):
    """A key (or namespace) is a ``str`` but not a valid name.

    Examples: the empty string, text that is not valid Unicode, or under dot names an
    empty segment such as ``"a..b"``, ``".a"`` or ``"a."``.
    """


class NameConflictError(MappingStoreError, ValueError):
    """Under dot names, a name would be both a leaf and a branch."""


# -- values ---------------------------------------------------------------------------------


class SerializationError(MappingStoreError, TypeError):
    """A value cannot be stored: its type is not supported by the codec."""


class CorruptValueError(MappingStoreError, ValueError):
    """A stored record is not a valid mappingstore record (garbage, truncated, bad checksum)."""


class IntegrityError(MappingStoreError, ValueError):
    """An encrypted record failed authentication.

    Raised for a flipped bit, a truncated ciphertext, or a ciphertext moved to another
    key, namespace or store. No value is ever returned from a failed check.
    """


class WrongPasswordError(MappingStoreError, ValueError):
    """The password (or raw key) does not unlock this store."""


class PasswordRequiredError(MappingStoreError, ValueError):
    """The store (or the value) is encrypted and no password or key was given."""


# -- store state ----------------------------------------------------------------------------


class ReadOnlyError(MappingStoreError, TypeError):
    """A mutator was called on a read-only store or view (as ``MappingProxyType`` does)."""


class StoreClosedError(MappingStoreError, ValueError):
    """The store was used after :meth:`~mappingstore.Store.close`."""


class InvalidOptionError(MappingStoreError, ValueError):
    """An option has a bad value, or options contradict each other."""


class OptionTypeError(MappingStoreError, TypeError):
    """An option has the wrong type (for example ``ttl="10"``)."""


class InvalidURLError(InvalidOptionError):
    """A store URL cannot be parsed."""


class UnknownSchemeError(InvalidURLError):
    """The URL scheme names no registered backend."""


# -- backend I/O ----------------------------------------------------------------------------


class BackendError(MappingStoreError, OSError):
    """The backing storage failed (I/O error, disk full, driver error)."""


class StoreCorruptError(BackendError):
    """The backing storage is not a mappingstore store, or is damaged."""


class StoreNotFoundError(BackendError, FileNotFoundError):
    """A store opened read-only (or a shared segment to attach) does not exist."""


class CapacityError(BackendError):
    """A hard size limit would be exceeded; nothing was changed."""


class BackendUnavailableError(BackendError):
    """The server cannot be reached (connection refused, reset, timed out)."""


class UnknownOutcomeError(BackendUnavailableError):
    """A write was sent but its outcome is unknown (the connection dropped before the reply).

    It is never retried automatically: a retry could apply it twice.
    """


class LockTimeoutError(MappingStoreError, TimeoutError):
    """A lock could not be acquired in time."""


class BatchConflictError(MappingStoreError, RuntimeError):
    """A batch was not committed: a record that a read-modify-write inside it (``modify``,
    ``pop``, ``setdefault``, a series or event-log write...) had read was changed by
    another writer before the commit. Nothing of the batch was written; run it again."""


# -- time series and events -----------------------------------------------------------------


class MissingFrequencyError(MappingStoreError, ValueError):
    """A time-series operation needs a frequency and none was given or configured."""


class EventConflictError(MappingStoreError, ValueError):
    """An event already exists at that timestamp in the sequence, or the timestamp falls
    in the history a ``prune()`` compacted."""


class ReplayError(MappingStoreError, ValueError):
    """A change cannot be replayed (unknown operator, op on a missing item); nothing stored."""


class InsecureStorageError(BackendError, PermissionError):
    """Refused to attach: the backing storage is owned by another user, writable by
    group or others, or not a regular file (a planted shared-memory segment, a symlink)."""
