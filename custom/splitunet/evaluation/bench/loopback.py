"""The ceiling for moving bytes between processes on this machine: a raw TCP copy over 127.0.0.1.

A receiving thread reads from a loopback socket into one reused buffer while the caller sends the same number of
bytes that one FLARE iteration moves. No serialization, TLS or messaging: what FLARE achieves is compared to this.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time

__all__ = ["loopback_tcp_copy", "LOOPBACK_HOST"]

LOOPBACK_HOST = "127.0.0.1"
# Large enough that per-call overhead vanishes, small enough to stay in cache-friendly sizes.
_CHUNK_BYTES = 1 << 22


def _receive(connection: socket.socket, num_bytes: int, received: list[int]) -> None:
    buffer = bytearray(_CHUNK_BYTES)
    view = memoryview(buffer)
    total = 0
    while total < num_bytes:
        count = connection.recv_into(view, min(len(buffer), num_bytes - total))
        if count == 0:
            break
        total += count
    received.append(total)


def _copy_once(num_bytes: int, payload: memoryview) -> float:
    with socket.create_server((LOOPBACK_HOST, 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection((LOOPBACK_HOST, port)) as sender:
            connection, _ = server.accept()
            with connection:
                received: list[int] = []
                reader = threading.Thread(target=_receive, args=(connection, num_bytes, received), daemon=True)
                start = time.perf_counter()
                reader.start()
                remaining = num_bytes
                while remaining > 0:
                    count = min(remaining, len(payload))
                    sender.sendall(payload[:count])
                    remaining -= count
                reader.join()
                elapsed = time.perf_counter() - start
    if received != [num_bytes]:
        raise RuntimeError(f"loopback copy received {received} of {num_bytes} bytes")
    return elapsed


def loopback_tcp_copy(num_bytes: int, repeats: int = 3) -> dict:
    """Send ``num_bytes`` through a TCP connection on 127.0.0.1 ``repeats`` times.

    Returns:
        ``{"bytes": n, "seconds": median seconds, "mb_per_s": n / median / 1e6, "repeats": r}`` (MB = 10^6 bytes).

    Raises:
        ValueError: ``num_bytes`` or ``repeats`` below 1.
    """
    if num_bytes < 1 or repeats < 1:
        raise ValueError(f"num_bytes and repeats must be >= 1, got {num_bytes} and {repeats}")
    payload = memoryview(bytes(min(num_bytes, _CHUNK_BYTES)))
    seconds = statistics.median(_copy_once(num_bytes, payload) for _ in range(repeats))
    return {"bytes": int(num_bytes), "seconds": seconds, "mb_per_s": num_bytes / seconds / 1e6, "repeats": repeats}
