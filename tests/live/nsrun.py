"""Run one network role inside a network namespace: `python nsrun.py NETNS ROLE ARGS...`.

The live tests start these as subprocesses (setns() happens here, in the child, before any
socket is made), read one JSON line from each and bound every wait with a timeout. Roles:

- sink ADDR PORT: accept one TCP connection, read to EOF, answer the SHA-256 of what came,
  print {"ready": true} once listening, then {"peer": [addr, port], "bytes": n, "sha256": h}.
- send ADDR PORT NBYTES: connect, send NBYTES of seeded pseudo-random data, read the answer,
  print {"sha256": sent, "answer": received, "seconds": s}.
- names ADDR:PORT[,ADDR:PORT...] COUNT: on each endpoint, answer every connection with the
  endpoint's text and close; exit after COUNT connections in all.
- fetch ADDR PORT COUNT: COUNT sequential connections; print the answers, or the error.
- probe ADDR PORT TIMEOUT: one connection attempt; print {"connected": bool, "error": text}.
"""

from __future__ import annotations

import hashlib
import json
import random
import selectors
import socket
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


ROLES = {"sink": sink, "send": send, "names": names, "fetch": fetch, "probe": probe}

if __name__ == "__main__":
    netns.setns(sys.argv[1], flags=0)
    ROLES[sys.argv[2]](*sys.argv[3:])
