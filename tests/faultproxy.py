"""A TCP proxy between a client and a real server that cuts connections on demand.

Shared by the PostgreSQL fault tests (``tests/test_postgres.py``, ``tests/test_aio_native.py``)
and the torture suite's network faults (``tests/torture/test_network_faults.py``): the
server is real, only the wire between it and the store misbehaves.
"""

from __future__ import annotations

import select
import socket
import threading
import time

__all__ = ["FaultProxy"]


class FaultProxy:
    """A TCP proxy to a server that cuts connections on demand, and whole outages.

    ``cut_after(marker)``: once the client sends bytes containing *marker*, forward them,
    let the server act on them, then close both sides without relaying any reply (and,
    with ``then_down=True``, refuse new connections until ``up()``).
    ``down()``: close every connection and refuse new ones (a server crash, as the client
    sees it); ``up()``: accept again.
    """

    def __init__(self, host: str, port: int, *, settle: float = 0.2) -> None:
        self.target = (host, port)
        self.settle = settle  # how long the server gets to act on a cut request
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.marker: bytes | None = None
        self.then_down = False
        self.refuse = False
        self.cuts = 0
        self.closing = False
        self.lock = threading.Lock()
        self.live: set[socket.socket] = set()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def cut_after(self, marker: bytes | None, *, then_down: bool = False) -> None:
        """Cut the connection that next sends *marker*; with *then_down*, also refuse
        every new connection from that moment until ``up()``."""
        self.then_down = then_down
        self.marker = marker

    def down(self) -> None:
        with self.lock:
            self.refuse = True
            for sock in self.live:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def up(self) -> None:
        with self.lock:
            self.refuse = False

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self.refuse:
                    client.close()
                    continue
                try:
                    server = socket.create_connection(self.target)
                except OSError:
                    client.close()
                    continue
                self.live.update((client, server))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        try:
            while not self.closing:
                ready, _, _ = select.select([client, server], [], [], 0.5)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        server.sendall(data)
                        marker = self.marker
                        if marker is not None and marker in data:
                            self.marker = None
                            self.cuts += 1
                            if self.then_down:
                                self.refuse = True
                            time.sleep(self.settle)  # the server acts; its answer is dropped
                            return
                    else:
                        client.sendall(data)
        except OSError:
            return
        finally:
            with self.lock:
                self.live.difference_update((client, server))
            for sock in (client, server):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        """Stop accepting, cut every connection, and wait for the accept thread to end
        (closing a listening socket does not wake an ``accept`` blocked in another thread;
        shutting it down does)."""
        self.closing = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.down()
        self.thread.join(timeout=5)
