"""A TCP relay that holds every byte for a fixed time in each direction: the one-way delay of an
emulated link (tools.netem) on a kernel without the netem qdisc, where tbf shapes the rate alone.

`python -m moespac_gguf.tools.delay_relay LISTEN_HOST:PORT TARGET_HOST:PORT DELAY_S` accepts
connections at LISTEN and relays each to a new connection to TARGET. What arrives from one side at
time t is sent to the other at t + DELAY_S, in order, so a request-response exchange (llama.cpp's
RPC protocol: one command, one reply) takes two delays more per round trip, as it does over a
link with that one-way delay; bytes keep flowing while earlier ones wait, so the rate stays the
link's. Nagle is off on both sides (a small reply waits for nothing but the delay). A connection
ends when both directions have ended; a reset on either side ends both. Runs until killed.
"""

from __future__ import annotations

import queue
import socket
import sys
import threading
import time

CHUNK = 1 << 20


def _pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
    """Copy src to dst, each chunk sent `delay` seconds after it was received; then half-close dst.
    A failed send shuts both sockets down, which ends the receiving side too."""
    pending: queue.SimpleQueue = queue.SimpleQueue()

    def send() -> None:
        try:
            while (item := pending.get()) is not None:
                due, data = item
                if (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        while data := src.recv(CHUNK):
            pending.put((time.monotonic() + delay, data))
    except OSError:
        pass
    pending.put(None)
    sender.join()


def _relay(client: socket.socket, target: tuple[str, int], delay: float) -> None:
    try:
        upstream = socket.create_connection(target)
    except OSError:
        client.close()
        return
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=_pump, args=(upstream, client, delay), daemon=True)
    back.start()
    _pump(client, upstream, delay)
    back.join()
    client.close()
    upstream.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str]) -> None:
    """Relay LISTEN to TARGET with DELAY_S each way until killed (the module's docstring)."""
    listen, target, delay = _address(argv[0]), _address(argv[1]), float(argv[2])
    server = socket.create_server(listen)
    while True:
        client, _ = server.accept()
        threading.Thread(target=_relay, args=(client, target, delay), daemon=True).start()


if __name__ == "__main__":
    main(sys.argv[1:])
