"""Has a SQLite database in WAL mode changed? One ``pread`` of its wal-index header.

In WAL mode every commit, by any connection of any process, rewrites the wal-index header
at the start of the ``-shm`` file (the unix VFS's shared memory; its layout is specified
in SQLite's "WAL-mode File Format" document and frozen in practice, since SQLite versions
back to 3.7.0 share it concurrently): the header holds the number of committed WAL frames,
the checksum of the last frame and the WAL's salts, which a restart of the WAL changes,
so two reads of the same 48 bytes mean no transaction committed in between. A writer
writes the header's second copy, then the first; the two differ while it does.

``SQLiteStore`` uses this for the reads a caller repeats (a time series' ``first()`` and
``last()``, which poll one small record): see ``SQLiteStore._rget_polled``. A token is
only trusted while one of the store's own connections to the file is open in WAL mode:
that connection holds SQLite's locks, so no other connection can take the file out of
WAL mode, nor delete or re-create its ``-shm`` file (only a program that ignores SQLite's
locking could: the same misuse that corrupts the database itself).

The descriptors. POSIX record locks belong to the process, and closing *any* descriptor
of a file drops every lock the process holds on it: closing ours would silently drop the
locks SQLite holds on the ``-shm`` file for this process's connections, and then another
process could checkpoint and reuse the WAL under their readers. So a descriptor is opened
once per ``-shm`` file (device and inode) and closed only once that file has been deleted
(SQLite deletes it when the last connection anywhere closes), when no lock on it can
matter any more.
"""

from __future__ import annotations

import os
import sys
import threading

__all__ = ["shm_descriptor", "sweep", "token"]

_HEADER = 48  # one copy of the wal-index header (WalIndexHdr)
_VERSION = (3007000).to_bytes(4, sys.byteorder)  # iVersion, in the host's byte order
_LOCK = threading.Lock()
_FDS: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) of a -shm file -> read-only fd
_ENABLED = hasattr(os, "pread") and os.name == "posix"


def shm_descriptor(db_path: str) -> int | None:
    """A read-only descriptor of *db_path*'s ``-shm`` file (shared, never to be closed by
    the caller), or None when there is none. Call it only while one of the caller's own
    connections has the database open in WAL mode and has read from it."""
    if not _ENABLED:
        return None
    name = db_path + "-shm"
    try:
        st = os.stat(name)
    except OSError:
        return None
    ident = (st.st_dev, st.st_ino)
    with _LOCK:
        fd = _FDS.get(ident)
        if fd is not None:
            return fd
        try:
            fd = os.open(name, os.O_RDONLY)
        except OSError:
            return None
        st = os.fstat(fd)
        # Registered under the file it really opened. Never closed here (see the module):
        # a second descriptor of a registered file (the path changed between the stat
        # and the open, twice) is kept open too.
        ident = (st.st_dev, st.st_ino)
        other = _FDS.setdefault(ident, fd)
        if other != fd:  # pragma: no cover - a race with two renames
            _PARKED.append(fd)
        return other


#: Descriptors that lost a race in shm_descriptor(): kept open, like the registered ones.
_PARKED: list[int] = []


def _reinit_lock() -> None:  # pragma: no cover - runs in a forked child
    global _LOCK
    _LOCK = threading.Lock()  # a parent thread may have held it at fork time


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_lock)


def token(fd: int) -> bytes | None:
    """The wal-index header read from *fd*, or None while a writer is writing it (its two
    copies differ) or when the file does not hold an initialised header of this layout."""
    try:
        data = os.pread(fd, 2 * _HEADER, 0)
    except OSError:
        return None
    head = data[:_HEADER]
    if len(data) != 2 * _HEADER or head != data[_HEADER:] or head[:4] != _VERSION:
        return None
    if head[12] != 1:  # isInit
        return None
    return head


def sweep() -> None:
    """Close the descriptors of ``-shm`` files that have been deleted."""
    with _LOCK:
        for ident, fd in list(_FDS.items()):
            try:
                gone = os.fstat(fd).st_nlink == 0
            except OSError:
                gone = True
            if gone:
                del _FDS[ident]
                try:
                    os.close(fd)
                except OSError:  # pragma: no cover
                    pass
