"""Run one network role inside a network namespace: `python nsrun.py NETNS ROLE ARGS...`.

The live tests start these as subprocesses (setns() happens here, in the child, before any
socket is made), read one JSON line from each and bound every wait with a timeout. Roles:

- sink ADDR PORT: accept one TCP connection, read to EOF, answer the SHA-256 of what came,
  print {"ready": true} once listening, then {"peer": [addr, port], "bytes": n, "sha256": h}.
- send ADDR PORT NBYTES: connect, send NBYTES of seeded pseudo-random data, read the answer,
  print {"sha256": sent, "answer": received, "seconds": s}.
- steps ADDR PORT NBYTES STEPS: connect and print {"ready": true, "sport": local port}; then
  STEPS times: send the next NBYTES/STEPS bytes of the same data, print {"step": i} and wait
  for a line on stdin; then as `send`.
- names ADDR:PORT[,ADDR:PORT...] COUNT: on each endpoint, answer every connection with the
  endpoint's text and close; exit after COUNT connections in all.
- fetch ADDR PORT COUNT: COUNT sequential connections; print the answers, or the error.
- probe ADDR PORT TIMEOUT: one connection attempt; print {"connected": bool, "error": text}.
- inject IFNAME HEX: send one raw frame out of the interface; print {"sent": n}.
- halfsend ADDR PORT NBYTES: as send, but after the first half it prints {"ready": true} and
  waits for a line on stdin before it sends the rest (a handoff happens in between).
- udpecho ADDR PORT: echo every datagram back until one says b"end"; print {"received": n,
  "sha256": h} of the distinct datagrams in sequence order.
- udpstream ADDR PORT COUNT: COUNT numbered datagrams, each sent until its echo came back
  (resent every 0.2 s); after half of them print {"ready": true} and wait for a line on stdin;
  print {"sha256": h, "resent": n}.
- capture IFNAME in|out PORT: record the TCP segments with data to or from PORT that the
  interface receives (in) or sends (out), until a FIN has passed and the link is quiet; print
  {"segments": [[seq, length], ...], "dropped": frames the capture itself lost}.
"""

from __future__ import annotations

import hashlib
import json
import random
import select
import selectors
import socket
import struct
import sys
import time

from pyroute2 import netns

TIMEOUT = 60.0


def out(obj: object) -> None:
    print(json.dumps(obj), flush=True)


def family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def listener(addr: str, port: int) -> socket.socket:
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(64)
    s.settimeout(TIMEOUT)
    return s


def sink(addr: str, port: str) -> None:
    with listener(addr, int(port)) as ls:
        out({"ready": True})
        conn, peer = ls.accept()
        conn.settimeout(TIMEOUT)
        h, n = hashlib.sha256(), 0
        while chunk := conn.recv(1 << 16):
            h.update(chunk)
            n += len(chunk)
        conn.sendall(h.hexdigest().encode())
        conn.close()
        out({"peer": list(peer[:2]), "bytes": n, "sha256": h.hexdigest()})


def send(addr: str, port: str, nbytes: str) -> None:
    data = random.Random(7).randbytes(int(nbytes))
    with socket.create_connection((addr, int(port)), timeout=TIMEOUT) as s:
        start = time.monotonic()
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(1024):
            answer += chunk
        seconds = time.monotonic() - start
    out({"sha256": hashlib.sha256(data).hexdigest(), "answer": answer.decode(),
         "seconds": seconds})


def steps(addr: str, port: str, nbytes: str, count: str) -> None:
    data = random.Random(7).randbytes(int(nbytes))
    n = int(count)
    with socket.create_connection((addr, int(port)), timeout=TIMEOUT) as s:
        out({"ready": True, "sport": s.getsockname()[1]})
        sys.stdin.readline()
        start = time.monotonic()
        for i in range(n):
            s.sendall(data[len(data) * i // n:len(data) * (i + 1) // n])
            out({"step": i})
            sys.stdin.readline()
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(1024):
            answer += chunk
        seconds = time.monotonic() - start
    out({"sha256": hashlib.sha256(data).hexdigest(), "answer": answer.decode(),
         "seconds": seconds})


def names(endpoints: str, count: str) -> None:
    sel = selectors.DefaultSelector()
    for ep in endpoints.split(","):
        addr, port = ep.rsplit(":", 1)
        sel.register(listener(addr, int(port)), selectors.EVENT_READ, ep)
    out({"ready": True})
    left = int(count)
    deadline = time.monotonic() + TIMEOUT
    while left and time.monotonic() < deadline:
        for key, _ in sel.select(1.0):
            conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
            conn.sendall(key.data.encode())
            conn.close()
            left -= 1
    out({"left": left})


def fetch(addr: str, port: str, count: str) -> None:
    answers = []
    for _ in range(int(count)):
        with socket.create_connection((addr, int(port)), timeout=TIMEOUT) as s:
            answer = b""
            while chunk := s.recv(1024):
                answer += chunk
            answers.append(answer.decode())
    out({"answers": answers})


def probe(addr: str, port: str, timeout: str) -> None:
    try:
        with socket.create_connection((addr, int(port)), timeout=float(timeout)):
            out({"connected": True, "error": ""})
    except OSError as err:
        out({"connected": False, "error": str(err)})


PACKET_OUTGOING, PACKET_HOST = 4, 0
SOL_PACKET, PACKET_STATISTICS = 263, 6


def capture(ifname: str, way: str, port: str) -> None:
    want = PACKET_OUTGOING if way == "out" else PACKET_HOST
    p = int(port)
    # ETH_P_ALL: a socket of one protocol does not see the frames the interface sends
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE: the capture must not drop
    s.bind((ifname, 0x0003))
    s.settimeout(0.5)
    out({"ready": True})
    segments, fin_at, deadline = [], None, time.monotonic() + TIMEOUT / 2
    while time.monotonic() < deadline:
        try:
            raw, addr = s.recvfrom(65536)
        except TimeoutError:
            if fin_at is not None:
                break  # quiet after the FIN: the transfer is over
            continue
        frame = raw[14:]  # the IPv4 packet after its Ethernet header
        if addr[2] != want or raw[12:14] != b"\x08\x00" or frame[9] != 6:
            continue
        ihl = (frame[0] & 0x0F) * 4
        sport, dport, seq = struct.unpack_from("!HHI", frame, ihl)
        if p not in (sport, dport):
            continue
        length = struct.unpack_from("!H", frame, 2)[0] - ihl - (frame[ihl + 12] >> 4) * 4
        if length:
            segments.append([seq, length])
        if frame[ihl + 13] & 0x01:
            fin_at = time.monotonic()
    _, dropped = struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    out({"segments": segments, "dropped": dropped})


def inject(ifname: str, hexframe: str) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as s:
        s.bind((ifname, 0))
        out({"sent": s.send(bytes.fromhex(hexframe))})


def _wait_stdin() -> None:
    ready, _, _ = select.select([sys.stdin], [], [], TIMEOUT)
    if not ready or not sys.stdin.readline():
        raise SystemExit("no go on stdin")


def halfsend(addr: str, port: str, nbytes: str) -> None:
    data = random.Random(int(port)).randbytes(int(nbytes))
    half = len(data) // 2
    with socket.create_connection((addr, int(port)), timeout=TIMEOUT) as s:
        s.sendall(data[:half])
        out({"ready": True})
        _wait_stdin()
        s.sendall(data[half:])
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(1024):
            answer += chunk
    out({"sha256": hashlib.sha256(data).hexdigest(), "answer": answer.decode()})


def _datagram(i: int) -> bytes:
    return struct.pack("!I", i) + random.Random(i).randbytes(500)


def udpecho(addr: str, port: str) -> None:
    with socket.socket(family(addr), socket.SOCK_DGRAM) as s:
        s.bind((addr, int(port)))
        s.settimeout(TIMEOUT)
        out({"ready": True})
        got: dict[int, bytes] = {}
        while True:
            data, peer = s.recvfrom(2048)
            s.sendto(data, peer)
            if data == b"end":
                break
            got[struct.unpack_from("!I", data)[0]] = data
    h = hashlib.sha256()
    for i in sorted(got):
        h.update(got[i])
    out({"received": len(got), "sha256": h.hexdigest(), "peer": list(peer[:2])})


def udpstream(addr: str, port: str, count: str) -> None:
    n, resent = int(count), 0
    h = hashlib.sha256()
    deadline = time.monotonic() + TIMEOUT
    with socket.socket(family(addr), socket.SOCK_DGRAM) as s:
        s.connect((addr, int(port)))
        s.settimeout(0.2)
        for i in [*range(n), -1]:
            if i == n // 2:
                out({"ready": True})
                _wait_stdin()
            data = b"end" if i < 0 else _datagram(i)
            while time.monotonic() < deadline:
                s.send(data)
                try:
                    if s.recv(2048) == data:
                        break
                except TimeoutError:
                    pass
                resent += 1
            else:
                raise SystemExit(f"datagram {i}: no echo")
            if i >= 0:
                h.update(data)
    out({"sha256": h.hexdigest(), "resent": resent})


ROLES = {"sink": sink, "send": send, "steps": steps, "names": names, "fetch": fetch,
         "probe": probe, "capture": capture, "inject": inject, "halfsend": halfsend,
         "udpecho": udpecho, "udpstream": udpstream}

if __name__ == "__main__":
    netns.setns(sys.argv[1], flags=0)
    ROLES[sys.argv[2]](*sys.argv[3:])
