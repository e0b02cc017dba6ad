"""Time of a live machine → VNIC handoff against the number of flows it carries (needs root).

Brings up tests/live/guest.toml under a suffix of its own, opens N UDP flows from the gateway's
inside namespace to the wire (one datagram each, echoed), runs `flowshift live handoff gw` and
prints the daemon's time per step (withdraw, dump, import, flush) and the whole command's.
Usage: sudo python bench/bench_handoff.py [N ...]   (default 100 1000 5000)
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "tests" / "live" / "guest.toml"
CLI = [sys.executable, "-c", "from flowshift.cli import main; main()", "live"]
OPEN = """
import socket, sys
socks = []
for i in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(b"x", ("198.51.100.2", 5010))
    s.recvfrom(16)
    socks.append(s)
print(len(socks))
"""
ECHO = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("198.51.100.2", 5010))
s.settimeout(30)
print("ready", flush=True)
while True:
    d, peer = s.recvfrom(16)
    s.sendto(d, peer)
"""


def once(n: int) -> tuple[dict[str, Any], float]:
    suffix = secrets.token_hex(4)
    env = {**os.environ, "FLOWSHIFT_LIVE_SUFFIX": suffix}

    def cli(*args: str) -> str:
        done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True,
                              timeout=300, check=True)
        return done.stdout

    cli("up", str(CONFIG))
    echo = None
    try:
        echo = subprocess.Popen(["ip", "netns", "exec", f"fs-wire-{suffix}", sys.executable,
                                 "-c", ECHO], stdout=subprocess.PIPE, text=True)
        assert echo.stdout is not None and echo.stdout.readline() == "ready\n"
        subprocess.run(["ip", "netns", "exec", f"fs-i-gw-{suffix}", sys.executable, "-c", OPEN,
                        str(n)], check=True, timeout=300, capture_output=True)
        start = time.monotonic()
        done = json.loads(cli("handoff", "gw", "--json"))
        total = time.monotonic() - start
        assert done["flows"] >= n, done
        return done, total
    finally:
        if echo is not None:
            echo.kill()
            echo.wait()
        cli("down")


def main() -> None:
    for n in [int(a) for a in sys.argv[1:]] or [100, 1000, 5000]:
        done, total = once(n)
        steps = ", ".join(f"{k} {v * 1000:.1f}" for k, v in done["phases"].items())
        print(f"{done['flows']:6d} flows: VNIC stalled {done['seconds'] * 1000:7.1f} ms "
              f"({steps} ms), `live handoff` end to end {total * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
