"""Has a SQLite database in WAL mode changed? One read of its wal-index header.

In WAL mode every commit, by any connection of any process, rewrites the wal-index header
at the start of the ``-shm`` file (the unix VFS's shared memory, which every connection
maps; its layout is specified in SQLite's "WAL-mode File Format" document and frozen in
practice, since SQLite versions back to 3.7.0 share it concurrently): the header holds the
number of committed WAL frames, the checksum of the last frame and the WAL's salts, which
a restart of the WAL changes, so two reads of the same 48 bytes mean no transaction
committed in between. A writer writes the header's second copy, then the first; the two
differ while it does.

``SQLiteStore`` uses this for the reads a caller repeats (a time series' ``first()`` and
``last()``, which poll one small record): see ``SQLiteStore._rget_polled``. A token is
only trusted while one of the store's own connections to the file is open in WAL mode:
that connection holds SQLite's locks, so no other connection can take the file out of WAL
mode, nor delete or re-create its ``-shm`` file (only a program that ignores SQLite's
locking could: the same misuse that corrupts the database itself).

How the header is read: from SQLite's own mapping of the ``-shm`` file in this process
(found once per connection in ``/proc/self/maps``), through ``/proc/self/mem``. Not by
opening the ``-shm`` file: POSIX record locks belong to the process, and closing *any*
descriptor of a file drops every lock the process holds on it, including the ones SQLite
holds for this process's connections (another process could then checkpoint and reuse
the WAL under their readers), so a descriptor of our own could never be closed while the
file lives. A read of ``/proc/self/mem`` at an address that is no longer mapped fails with
an error instead of crashing, and costs about a microsecond. Linux only; elsewhere (or
where ``/proc`` is not readable) the polled reads simply read the file each time.
"""

from __future__ import annotations

import os
import sys
import threading

__all__ = ["header_address", "token"]

_HEADER = 48  # one copy of the wal-index header (WalIndexHdr)
_VERSION = (3007000).to_bytes(4, sys.byteorder)  # iVersion, in the host's byte order
_ENABLED = sys.platform.startswith("linux") and hasattr(os, "pread")
_lock = threading.Lock()
_mem: int | None = None  # a descriptor of /proc/self/mem, this process's own
_mem_failed = False


def _memory() -> int | None:
    global _mem, _mem_failed
    if _mem is None and not _mem_failed:
        with _lock:
            if _mem is None and not _mem_failed:
                try:
                    _mem = os.open("/proc/self/mem", os.O_RDONLY)
                except OSError:
                    _mem_failed = True
    return _mem


def _forked() -> None:  # pragma: no cover - runs in a forked child
    global _lock, _mem, _mem_failed
    _lock = threading.Lock()  # a parent thread may have held it at fork time
    # The inherited descriptor reads the parent's memory: open the child's own next time.
    if _mem is not None:
        try:
            os.close(_mem)
        except OSError:
            pass
    _mem, _mem_failed = None, False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def header_address(shm_path: str) -> int | None:
    """Where this process maps the start of *shm_path* (SQLite's own mapping), or None.

    Call it only while one of the caller's own connections has the database open in WAL
    mode and has read from it (so SQLite has mapped the file and keeps it mapped)."""
    if not _ENABLED or _memory() is None:
        return None
    try:
        st = os.stat(shm_path)
        with open("/proc/self/maps", "rb") as fh:
            maps = fh.read()
    except OSError:
        return None
    inode = str(st.st_ino).encode()
    device = (os.major(st.st_dev), os.minor(st.st_dev))
    name = os.fsencode(shm_path)
    found: list[int] = []
    # Lines end at "\n" only: the kernel escapes that one in a path, not "\r" (which
    # splitlines() would also cut at, letting a file name forge a line).
    for line in maps.split(b"\n"):
        if inode not in line:  # most lines: no split
            continue
        fields = line.split(None, 5)
        if len(fields) < 6 or fields[4] != inode:
            continue
        try:
            start, end = (int(x, 16) for x in fields[0].split(b"-"))
            offset = int(fields[2], 16)
            major, minor = (int(x, 16) for x in fields[3].split(b":"))
        except ValueError:  # pragma: no cover - not the kernel's format
            continue
        if offset or end - start < 2 * _HEADER:
            continue
        # The same inode on the same device; or, where the kernel shows another device
        # number than stat() (overlay file systems), the same inode at the same path.
        if (major, minor) == device or fields[5].strip() == name:
            found.append(start)
    # Exactly one: a second mapping means a second SQLite library in the process (a
    # wheel that bundles its own), whose mapping may go away while ours stays, and its
    # address be reused by another file's mapping. Which one is ours cannot be told.
    return found[0] if len(found) == 1 else None


def token(address: int) -> bytes | None:
    """The wal-index header at *address* (from :func:`header_address`), or None while a
    writer is writing it (its two copies differ), when it is not an initialised header of
    this layout, or when the address is no longer mapped."""
    fd = _mem
    if fd is None:
        return None
    try:
        data = os.pread(fd, 2 * _HEADER, address)
    except OSError:
        return None
    head = data[:_HEADER]
    if len(data) != 2 * _HEADER or head != data[_HEADER:] or head[:4] != _VERSION:
        return None
    if head[12] != 1:  # isInit
        return None
    return head
