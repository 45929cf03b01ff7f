"""A small threaded TCP proxy on a free loopback port, to cut a service off from the processes under test.

Processes started by a test connect to `proxy.port` instead of the service's own port; the test itself
keeps its direct connection, so it can still read and write while the processes see an outage:

    with TcpProxy(("127.0.0.1", 5432)) as proxy:
        start_worker(..., env={"POSTGRES_PORT": str(proxy.port)})
        proxy.cut()      # every open connection is reset; new ones are accepted and reset at once
        proxy.restore()  # new connections are forwarded again

A cut resets connections (SO_LINGER 0: an RST, not a polite FIN), as a crashed server or a dropped
network path would look to a client that writes; the listening socket stays open, so nothing else can
take the port meanwhile and a client fails fast instead of waiting for a connect timeout.

Standard library only.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from types import TracebackType

_CHUNK = 65536


def _reset(sock: socket.socket) -> None:
    """Close abruptly: the peer gets an RST, whatever it had in flight is gone."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Pipe:
    """One proxied connection: the client's socket, the upstream one, and the thread that pumps both."""

    def __init__(self, client: socket.socket, upstream: socket.socket, on_close) -> None:
        self.client = client
        self.upstream = upstream
        self._on_close = on_close
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="tcpproxy-pipe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def reset(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            _reset(self.client)
            _reset(self.upstream)
        self._on_close(self)

    def _pump(self) -> None:
        peer = {self.client: self.upstream, self.upstream: self.client}
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self.client, selectors.EVENT_READ)
                sel.register(self.upstream, selectors.EVENT_READ)
                while not self._closed.is_set():
                    for key, _ in sel.select(timeout=0.2):
                        data = key.fileobj.recv(_CHUNK)
                        if not data:
                            return
                        peer[key.fileobj].sendall(data)
        except (OSError, ValueError):
            pass  # reset by cut(), or by either end
        finally:
            if not self._closed.is_set():
                self._closed.set()
                for sock in (self.client, self.upstream):
                    with contextlib.suppress(OSError):
                        sock.close()
            self._on_close(self)


class TcpProxy:
    """Forward connections from a free loopback port to `target` (host, port) until `cut()`."""

    def __init__(self, target: tuple[str, int], *, host: str = "127.0.0.1") -> None:
        self.target = (target[0], int(target[1]))
        self.host = host
        self._listener = socket.create_server((host, 0), backlog=128)
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pipes: set[_Pipe] = set()
        self._cut = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="tcpproxy-accept", daemon=True)
        self.connections = 0  # accepted and forwarded
        self.refused = 0  # accepted while cut (or unable to reach the target) and reset at once
        self._thread.start()

    # --- fault injection -------------------------------------------------------------------------------

    def cut(self) -> None:
        """Reset every open connection and refuse new ones (accept, then reset) until `restore()`."""
        with self._lock:
            self._cut = True
            pipes = list(self._pipes)
        for pipe in pipes:
            pipe.reset()

    def restore(self) -> None:
        """Forward new connections again."""
        with self._lock:
            self._cut = False

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._pipes)

    # --- life cycle ------------------------------------------------------------------------------------

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            pipes = list(self._pipes)
        for pipe in pipes:
            pipe.reset()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            if self._cut:
                self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                self.refused += 1
                _reset(client)
                continue
            pipe = _Pipe(client, upstream, self._forget)
            with self._lock:
                if self._cut:  # cut while we were connecting upstream
                    refuse = True
                else:
                    refuse = False
                    self._pipes.add(pipe)
                    self.connections += 1
            if refuse:
                self.refused += 1
                _reset(client)
                _reset(upstream)
                continue
            pipe.start()

    def _forget(self, pipe: _Pipe) -> None:
        with self._lock:
            self._pipes.discard(pipe)
