"""A throttling TCP proxy on 127.0.0.1, for tests that need a transfer to be slow enough, and
far enough along, to break it in the middle (tests/integration/test_outages.py puts one between
the Docker engine and a registry and kills the registry once a push has sent 16 MiB).

    with ThrottleProxy(("127.0.0.1", 5011), rate=8 << 20, threshold=16 << 20) as proxy:
        ...                        # clients connect to proxy.address ("127.0.0.1:<port>")
        proxy.tripped.wait(60)     # set once `threshold` bytes went client -> upstream
        proxy.forwarded            # bytes sent client -> upstream so far, all connections

Each accepted connection gets its own connection to ``upstream`` and a thread per direction.
Only the client -> upstream direction is throttled (one budget of ``rate`` bytes/s shared by
all connections) and counted; upstream -> client passes as it comes. An end-of-stream is
passed on as a half-close, a reset or error closes both sides of that pair, and a client whose
upstream refuses the connection is closed at once. `stop()` closes the listener and every
socket and joins the threads (bounded). A plain module, no pytest: no mocks, real sockets.
"""
from __future__ import annotations

import socket
import threading
import time

CHUNK = 64 << 10


class ThrottleProxy:
    def __init__(self, upstream: tuple[str, int], rate: int = 8 << 20, threshold: int | None = None,
                 port: int = 0, connect_timeout: float = 5):
        self.upstream = upstream
        self.rate = rate
        self.threshold = threshold
        self.connect_timeout = connect_timeout
        self.tripped = threading.Event()  # set once `forwarded` reaches `threshold`
        self._forwarded = 0
        self._slot = 0.0  # monotonic time from which the next client -> upstream chunk may go
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.25)  # the accept loop notices stop() within this
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._acceptor = threading.Thread(target=self._accept, name=f"throttle-accept-{self.address}", daemon=True)

    @property
    def forwarded(self) -> int:
        """Bytes sent client -> upstream so far, over all connections."""
        with self._lock:
            return self._forwarded

    def start(self) -> "ThrottleProxy":
        self._acceptor.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        """Close the listener and every connection, and join all threads (at most ``timeout`` s)."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        self._acceptor.join(max(0.0, deadline - time.monotonic()))
        self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            _close(sock)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in [self._acceptor, *threads] if t.is_alive()]
        assert not alive, f"proxy threads still running after {timeout} s: {alive}"

    def __enter__(self) -> "ThrottleProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.upstream, timeout=self.connect_timeout)
            except OSError:
                _close(client)  # the upstream is down: the client sees its connection closed
                continue
            upstream.settimeout(None)
            pair = _Pair(client, upstream)
            threads = [threading.Thread(target=self._pump, args=(client, upstream, True, pair), daemon=True,
                                        name=f"throttle-up-{self.address}"),
                       threading.Thread(target=self._pump, args=(upstream, client, False, pair), daemon=True,
                                        name=f"throttle-down-{self.address}")]
            with self._lock:
                if self._stopping.is_set():
                    pair.close()
                    return
                self._sockets.update(pair.sockets)
                self._threads = [t for t in self._threads if t.is_alive()] + threads
            for thread in threads:
                thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool, pair: "_Pair") -> None:
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    dst.shutdown(socket.SHUT_WR)  # pass the end of stream on
                    return
                if up and not self._wait_for_slot(len(data)):
                    return
                dst.sendall(data)
                if up:
                    with self._lock:
                        self._forwarded += len(data)
                        reached = self.threshold is not None and self._forwarded >= self.threshold
                    if reached:
                        self.tripped.set()
        except OSError:
            pair.close()  # a reset or a closed socket: end both directions of this pair
        finally:
            if pair.done():  # the other direction has ended too
                pair.close()
                with self._lock:
                    self._sockets.difference_update(pair.sockets)

    def _wait_for_slot(self, size: int) -> bool:
        """Throttle: wait until ``size`` bytes fit the shared budget; False when stopping."""
        with self._lock:
            start = max(self._slot, time.monotonic())
            self._slot = start + size / self.rate
        return not self._stopping.wait(max(0.0, start - time.monotonic()))


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class _Pair:
    """A client connection and its upstream connection; `done()` is true for the second of
    the two directions to end."""

    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.sockets = (client, upstream)
        self._running = 2
        self._lock = threading.Lock()

    def done(self) -> bool:
        with self._lock:
            self._running -= 1
            return self._running == 0

    def close(self) -> None:
        for sock in self.sockets:
            _close(sock)
