"""tests/throttle.py's proxy against tiny TCP servers on 127.0.0.1: bytes pass unchanged both
ways, end of stream is passed on, the counter and the threshold event fire, a client whose
upstream is down is closed, and stop() leaves no thread behind. No timed assertions: how fast
the throttle lets bytes through is not checked, only what it lets through."""
from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest

from tests.throttle import ThrottleProxy

FAST = 256 << 20  # bytes/s: the throttle is in the path but does not slow these tests down


class Server:
    """A one-connection-at-a-time server on 127.0.0.1: ``echo`` sends back what it reads;
    ``sink`` reads to end of stream, then answers with the sha256 and length of what it read."""

    def __init__(self, mode: str):
        self.mode = mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30)
            digest, size = hashlib.sha256(), 0
            while data := conn.recv(1 << 16):
                if self.mode == "echo":
                    conn.sendall(data)
                else:
                    digest.update(data)
                    size += len(data)
            if self.mode == "sink":
                conn.sendall(f"{digest.hexdigest()} {size}".encode())

    def close(self) -> None:
        self.listener.close()
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture
def server(request):
    started = Server(request.param)
    yield started
    started.close()


def connect(proxy: ThrottleProxy) -> socket.socket:
    host, port = proxy.address.rsplit(":", 1)
    assert host == "127.0.0.1"
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 16):
        chunks.append(data)
    return b"".join(chunks)


def proxy_threads(proxy: ThrottleProxy) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.endswith(proxy.address) and t.is_alive()]


@pytest.mark.parametrize("server", ["echo"], indirect=True)
def test_bytes_come_back_unchanged_and_the_threshold_fires(server):
    payload = os.urandom(3 << 20)
    proxy = ThrottleProxy(("127.0.0.1", server.port), rate=FAST, threshold=1 << 20).start()
    try:
        assert not proxy.tripped.is_set() and proxy.forwarded == 0
        with connect(proxy) as sock:
            sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
            sender.start()  # echo and read at once: neither side's buffers fill up
            echoed = read_all(sock)
            sender.join(30)
        assert proxy.tripped.wait(30)
    finally:
        proxy.stop()
    assert echoed == payload
    assert proxy.forwarded == len(payload)  # every byte client -> upstream counted, once
    assert proxy_threads(proxy) == []


@pytest.mark.parametrize("server", ["sink"], indirect=True)
def test_end_of_stream_is_passed_on_and_below_the_threshold_nothing_fires(server):
    payload = os.urandom(100_000)
    proxy = ThrottleProxy(("127.0.0.1", server.port), rate=FAST, threshold=1 << 20)
    with proxy:
        with connect(proxy) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)  # the sink answers only once it sees the end of stream
            answer = read_all(sock).decode()
    assert answer == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}"
    assert proxy.forwarded == len(payload) and not proxy.tripped.is_set()
    assert proxy_threads(proxy) == []


def test_the_client_of_an_upstream_that_is_down_is_closed():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed again: nothing listens there
    with ThrottleProxy(("127.0.0.1", port)) as proxy:
        with connect(proxy) as sock:
            try:
                assert read_all(sock) == b""
            except ConnectionResetError:
                pass  # closed with a reset: as good as an end of stream here
    assert proxy.forwarded == 0 and not proxy.tripped.is_set()


@pytest.mark.parametrize("server", ["echo"], indirect=True)
def test_stop_with_a_connection_open_closes_it_and_joins_the_threads(server):
    proxy = ThrottleProxy(("127.0.0.1", server.port), rate=FAST).start()
    sock = connect(proxy)
    try:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
        proxy.stop(timeout=10)
        assert proxy_threads(proxy) == []
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
    finally:
        sock.close()
    assert proxy.forwarded == 4
