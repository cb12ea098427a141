"""A well-behaved client's round trip while another client attacks the server.

One ``policylink serve`` process listens on WebSocket, gRPC, TCP (with
``--trust-pickle``) and, when LeRobot is installed, the LeRobot-compat port.
A good client sends a 224x224 camera + 14-d state over WebSocket at about
100 Hz the whole time. Each phase sends one hostile input; the table gives the
good client's p50 and worst round trip during that phase, how the server
answered the hostile sender, and the server's memory (RSS) after it.

Targets: no hostile input raises the good client's worst round trip above
50 ms, server RSS growth under 200 MB, every hostile sender answered with a
named error or a close. Every socket is on 127.0.0.1; every attack is bounded
in count and time.

    .venv/bin/python benchmarks/abuse.py [--phase-s 3] [--no-write]
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import pickle
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from _process import free_port, policylink_process
from _report import percentile_ms, write_section
from policylink import PolicyClient
from policylink.codec import packb, unpackb

IDLE_TIMEOUT_S = 10  # the run sets --idle-timeout 10 (default 300) so that idle connections close within the run
HALF_FRAME_WAIT_S = 60


class GoodClient:
    """Infers at about 100 Hz in a process of its own (the attacks' work must not share its GIL).

    Keeps (time, round trip) of every request and any error; ``time.perf_counter``
    is the system's monotonic clock, so its times compare with this process's.
    """

    def __init__(self, url: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._results, child = context.Pipe(duplex=False)
        self._process = context.Process(target=_good_client_loop, args=(url, self._stop, child), daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.errors: list[str] = []

    def start(self) -> None:
        self._process.start()

    def finish(self) -> None:
        self._stop.set()
        self.samples, self.errors = self._results.recv()
        self._process.join(10)

    def window(self, start: float, end: float) -> list[float]:
        return [rtt for t, rtt in self.samples if start <= t <= end]


def _good_client_loop(url: str, stop: Any, results: Any) -> None:
    rng = np.random.default_rng(0)
    obs = {"observation.state": rng.normal(size=14).astype(np.float32), "observation.images.front": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)}
    samples, errors = [], []
    with PolicyClient(url, timeout=10) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                client.infer(obs)
                samples.append((started, time.perf_counter() - started))
            except Exception as exc:  # reported in the table, never hidden
                errors.append(f"{type(exc).__name__}: {exc}")
            stop.wait(max(0.0, 0.01 - (time.perf_counter() - started)))
    results.send((samples, errors))


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- the hostile inputs ---------------------------------------------------------------------


def _ws_send(port: int, payload: bytes) -> str:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{port}", max_size=None, open_timeout=10) as ws:
        ws.recv(timeout=10)
        ws.send(payload)
        try:
            reply = ws.recv(timeout=30)
        except ConnectionClosed as exc:
            return f"closed {exc.rcvd.code if exc.rcvd else '?'}"
    return reply if isinstance(reply, str) else "a reply?!"


def msgpack_element_bomb(ports: dict) -> str:
    """24 MiB msgpack array of 24M empty arrays (inside the 64 MiB message limit)."""
    return _ws_send(ports["ws"], b"\xdd" + struct.pack(">I", 24_000_000) + b"\x90" * 24_000_000)


def msgpack_deep_nesting(ports: dict) -> str:
    """1M nested one-element arrays (1 MB)."""
    return _ws_send(ports["ws"], b"\x91" * 1_000_000 + b"\xc0")


def _tcp_exchange(port: int, payload: bytes) -> Any:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        _read_frame(sock)
        sock.sendall(struct.pack(">I", len(payload)) + payload)
        return _read_frame(sock)


def _read_frame(sock: socket.socket) -> bytes:
    header = _recv(sock, 4)
    return _recv(sock, struct.unpack(">I", header)[0])


def _recv(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def pickle_bomb(ports: dict) -> str:
    """A 43-byte pickle of list(range(25_000_000)) to the --trust-pickle TCP port."""
    payload = b"\x80\x04cbuiltins\nlist\ncbuiltins\nrange\nJ" + struct.pack("<i", 25_000_000) + b"\x85R\x85R."
    reply = pickle.loads(_tcp_exchange(ports["tcp"], payload))  # our own server's reply: a pickled dict
    return reply["error"] if isinstance(reply, dict) else f"a {type(reply).__name__}?!"


def torch_tensor_pickle(ports: dict) -> str:
    """The first pickled torch tensor (used to import torch inside the request)."""
    import torch

    buffer = io.BytesIO()
    pickle.dump({"state": torch.zeros(14), "raw_lang": "pick"}, buffer)
    reply = pickle.loads(_tcp_exchange(ports["tcp"], buffer.getvalue()))
    return f"answered: {len(reply)} actions" if isinstance(reply, list) else str(reply)


def _grpc_infer(port: int, payload: bytes) -> str:
    import grpc

    from policylink.proto.v1 import policylink_pb2 as pb
    from policylink.proto.v1 import policylink_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)])
    try:
        session = pb_grpc.PolicyServiceStub(channel).GetMetadata(pb.MetadataRequest(), timeout=10).session_id
        channel.unary_unary("/policylink.v1.PolicyService/Infer")(payload, metadata=[("policylink-session", session)], timeout=30)
        return "answered with actions"
    except grpc.RpcError as exc:
        kind = dict(exc.trailing_metadata() or ()).get("policylink-error-kind", "-")
        return f"{exc.code().name} ({kind}): {exc.details()}"
    finally:
        channel.close()


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header claims ``width`` x ``height``."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _observation_with_jpeg(jpeg: bytes) -> bytes:
    from policylink.proto.v1 import policylink_pb2 as pb

    message = pb.Observation()
    message.fields["observation.images.front"].jpeg = jpeg
    return message.SerializeToString()


def jpeg_claiming_huge(ports: dict) -> str:
    """A 1 KB JPEG whose header claims 20000x20000 pixels (1.2 GB decoded), over gRPC."""
    return _grpc_infer(ports["grpc"], _observation_with_jpeg(_jpeg_claiming(20000, 20000)))


def jpeg_at_the_limit(ports: dict) -> str:
    """A real 4096x4096 uniform JPEG (48 MB decoded, the largest admitted), over gRPC."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4096, 4096), (90, 120, 30)).save(buffer, format="JPEG", quality=90)
    return _grpc_infer(ports["grpc"], _observation_with_jpeg(buffer.getvalue()))


def protobuf_shape_bomb(ports: dict) -> str:
    """A 19 MiB Observation whose one tensor has a packed shape of 20M zeros, over gRPC."""
    count = 20_000_000
    tensor = b"\x12" + _varint(count) + b"\x00" * count
    value = b"\x0a" + _varint(len(tensor)) + tensor
    entry = b"\x0a\x01a\x12" + _varint(len(value)) + value
    return _grpc_infer(ports["grpc"], b"\x0a" + _varint(len(entry)) + entry)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def half_frames(ports: dict) -> str:
    """On every port at once, half a frame and then silence; reports when each was closed (up to 60 s)."""
    partial = {
        "ws": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              b"Sec-WebSocket-Version: 13\r\n\r\n" + bytes([0x82, 0x80 | 126]) + (1000).to_bytes(2, "big") + b"\x00" * 4 + b"x" * 10,
        "tcp": struct.pack(">I", 1000) + b"x" * 10,
        "grpc": b"PRI * HTTP/2.0\r\n\r\nSM\r\n",
    }
    if "lerobot" in ports:
        partial["lerobot"] = partial["grpc"]
    results: dict[str, str] = {}
    threads = [threading.Thread(target=_until_closed, args=(name, ports[name], payload, results)) for name, payload in partial.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HALF_FRAME_WAIT_S + 10)
    return "; ".join(f"{name}: {results.get(name, 'no result')}" for name in partial)


def _until_closed(name: str, port: int, payload: bytes, results: dict) -> None:
    """Send ``payload``, then read until the server closes; note when, and the TCP port's error frame."""
    started, data = time.monotonic(), b""
    with socket.create_connection(("127.0.0.1", port), timeout=HALF_FRAME_WAIT_S) as sock:
        sock.sendall(payload)
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, socket.timeout):
                results[name] = f"still open after {HALF_FRAME_WAIT_S} s"
                return
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                break
            data += chunk
    answer = f"closed after {time.monotonic() - started:.0f} s"
    if name == "tcp" and len(data) > 8:  # the metadata frame, then the error frame
        first = struct.unpack(">I", data[:4])[0]
        answer += f" ('{unpackb(data[4 + first + 4:])['error']}')"
    results[name] = answer


def idle_connections(ports: dict) -> str:
    """300 connections that never send a byte: 150 to the WebSocket port, 150 to the TCP port."""
    sockets = [socket.create_connection(("127.0.0.1", ports[name]), timeout=30) for name in ("ws", "tcp") for _ in range(150)]
    started, closed = time.monotonic(), 0
    for sock in sockets:
        sock.settimeout(max(0.1, started + IDLE_TIMEOUT_S + 15 - time.monotonic()))
        try:
            while sock.recv(65536):
                pass
            closed += 1
        except (TimeoutError, socket.timeout):
            pass
        except ConnectionResetError:
            closed += 1
        sock.close()
    return f"{closed} of 300 closed by the server within {time.monotonic() - started:.0f} s (WebSocket: handshake timeout; TCP: --idle-timeout {IDLE_TIMEOUT_S})"


ATTACKS: list[tuple[str, Callable[[dict], str]]] = [
    ("msgpack element bomb (24M empty arrays, 24 MiB)", msgpack_element_bomb),
    ("msgpack deep nesting (1M levels)", msgpack_deep_nesting),
    ("pickle bomb list(range(25e6)), 43 bytes, --trust-pickle TCP", pickle_bomb),
    ("first pickled torch tensor, --trust-pickle TCP", torch_tensor_pickle),
    ("JPEG claiming 20000x20000 (gRPC)", jpeg_claiming_huge),
    ("JPEG 4096x4096 at the pixel limit (gRPC)", jpeg_at_the_limit),
    ("protobuf packed-shape bomb, 19 MiB (gRPC)", protobuf_shape_bomb),
    ("half frames on every port", half_frames),
    ("300 idle connections", idle_connections),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase-s", type=float, default=3.0, help="shortest phase, seconds (default: 3)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch BENCHMARKS.md")
    args = parser.parse_args()
    _import_attack_modules()

    ports = {"grpc": free_port(), "tcp": free_port()}
    flags = ["--policy.type", "zeros", "--policy.action_dim", "14", "--grpc-port", str(ports["grpc"]), "--tcp-port", str(ports["tcp"]),
             "--trust-pickle", "--idle-timeout", str(IDLE_TIMEOUT_S)]
    try:
        import lerobot  # noqa: F401

        ports["lerobot"] = free_port()
        flags += ["--lerobot-compat-port", str(ports["lerobot"])]
    except ImportError:
        pass
    rows, worst_all, growth_all, unanswered = [], 0.0, 0.0, []
    phases_done: list[tuple[str, bool, str, float, float, float]] = []
    with policylink_process(*flags) as (ws_port, process):
        ports["ws"] = ws_port
        good = GoodClient(f"ws://127.0.0.1:{ws_port}")
        good.start()
        time.sleep(3.0)  # the client process starts, connects, warms up
        baseline_rss = rss_mb(process.pid)
        phases: list[tuple[str, Callable[[dict], str] | None]] = [("none (baseline)", None), *ATTACKS]
        for name, attack in phases:
            started = time.perf_counter()
            answer = "-"
            if attack is not None:
                try:
                    answer = attack(ports)
                except Exception as exc:  # an attack the server did not answer is a finding, not a crash of the benchmark
                    answer = f"no answer: {type(exc).__name__}: {exc}"
                    unanswered.append(name)
            remaining = args.phase_s - (time.perf_counter() - started)
            if remaining > 0:
                time.sleep(remaining)
            rss = rss_mb(process.pid)
            phases_done.append((name, attack is not None, answer, started, time.perf_counter(), rss))
            print(f"{name}: RSS {rss:.0f} MB; {answer}", flush=True)
        peak = rss_mb(process.pid, "VmHWM")
        good.finish()
    for name, hostile, answer, start, end, rss in phases_done:
        rtts = good.window(start, end)
        p50, worst = percentile_ms(rtts, 50), max(rtts) * 1e3 if rtts else float("nan")
        if hostile:
            worst_all, growth_all = max(worst_all, worst), max(growth_all, rss - baseline_rss)
        rows.append(f"| {name} | {_cell(answer)} | {len(rtts)} | {p50:.2f} | {worst:.1f} | {rss - baseline_rss:+.0f} |")
    met = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    body = "\n".join([
        "A good client (WebSocket, 224x224 camera + 14-d state, about 100 Hz) while one hostile input at a time hits the server "
        f"(`policylink serve --policy.type zeros` with gRPC, TCP `--trust-pickle`{', LeRobot-compat' if 'lerobot' in ports else ''} and `--idle-timeout {IDLE_TIMEOUT_S}`; "
        f"each phase at least {args.phase_s:g} s). RSS growth is against the server's RSS before the first attack ({baseline_rss:.0f} MB); peak RSS over the run {peak:.0f} MB.",
        "",
        "| hostile input | server's answer to the hostile sender | good requests | good p50 (ms) | good worst (ms) | server RSS growth (MB) |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"- Good client's worst round trip under any attack: {worst_all:.1f} ms (target 50 ms): {met(worst_all <= 50)}.",
        f"- Largest server RSS growth: {growth_all:+.0f} MB (target under 200 MB): {met(growth_all < 200)}.",
        f"- Hostile senders answered with a named error or a close: {met(not unanswered)}{' (not: ' + ', '.join(unanswered) + ')' if unanswered else ''}.",
        f"- Good client errors: {len(good.errors)}{' (' + good.errors[0] + ')' if good.errors else ''}.",
    ])
    print(body)
    if not args.no_write:
        write_section("Abuse: a good client's round trip under hostile input", body)


def _import_attack_modules() -> None:
    """Everything the attacks use, imported before the first phase (an import is not an attack)."""
    import grpc  # noqa: F401
    import PIL.Image  # noqa: F401
    import websockets.sync.client  # noqa: F401

    import policylink.proto.v1.policylink_pb2_grpc  # noqa: F401
    try:
        import torch  # noqa: F401
    except ImportError:
        pass


def _cell(text: str) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= 220 else text[:217] + "..."


if __name__ == "__main__":
    main()
