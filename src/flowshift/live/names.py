"""Every name and path the live runtime creates, derived from one optional suffix.

Users get the fixed names (`fs-host`, `fs-wire`, `fs-m-<machine>`, `/run/flowshift/live/`). Tests
set FLOWSHIFT_LIVE_SUFFIX so that parallel runs (and a user's live host) never collide: every
namespace name and the run directory then carry it. Interface names live inside our own
namespaces, so they need no suffix, only the kernel's 15-character limit.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

SUFFIX_ENV = "FLOWSHIFT_LIVE_SUFFIX"
RUN_ROOT = Path("/run/flowshift")
IFNAMSIZ = 15  # usable characters of a Linux interface name
UPLINK = "fs-up"  # fs-host's end of the veth to fs-wire
PORT_PREFIX = "fs-p-"  # fs-host's end of a machine's veth
PEER_IF = "eth0"  # the other end, in the machine's namespace or in fs-wire
# The gateway every machine and the wire route through: a link-local address with a permanent
# neighbour entry for fs-host's port, so no ARP or ND ever has to reach the daemon.
GATEWAY4 = "169.254.0.1"
GATEWAY6 = "fe80::1"
# The guest router's next hop towards the machine's addresses (in fs-i-<machine>), likewise
INSIDE4 = "169.254.0.2"
INSIDE6 = "fe80::2"
INSIDE_IF = "inside"  # the guest router's port towards fs-i-<machine>

_SUFFIX_RE = re.compile(r"[a-z0-9]{1,8}")


class LiveError(Exception):
    """A problem of the live runtime, as one line for the user."""


@dataclass(frozen=True)
class Names:
    suffix: str = ""

    @classmethod
    def from_env(cls) -> Names:
        suffix = os.environ.get(SUFFIX_ENV, "")
        if suffix and not _SUFFIX_RE.fullmatch(suffix):
            raise LiveError(f"{SUFFIX_ENV}={suffix!r}: expected 1-8 of a-z 0-9")
        return cls(suffix)

    def _ns(self, base: str) -> str:
        return f"{base}-{self.suffix}" if self.suffix else base

    @property
    def host(self) -> str:
        return self._ns("fs-host")

    @property
    def wire(self) -> str:
        return self._ns("fs-wire")

    def machine(self, name: str) -> str:
        return self._ns(f"fs-m-{name}")

    def inside(self, name: str) -> str:
        """The namespace behind a machine-tier machine's router: its addresses live there."""
        return self._ns(f"fs-i-{name}")

    @property
    def run_dir(self) -> Path:
        return RUN_ROOT / (f"live-{self.suffix}" if self.suffix else "live")

    @property
    def state(self) -> Path:
        return self.run_dir / "state.json"

    @property
    def control(self) -> Path:
        return self.run_dir / "control.sock"

    @property
    def log(self) -> Path:
        return self.run_dir / "daemon.log"


def port_name(machine: str) -> str:
    """fs-host's interface for a machine: `fs-p-<machine>`, shortened with a hash when long."""
    name = PORT_PREFIX + machine
    if len(name) <= IFNAMSIZ:
        return name
    digest = hashlib.blake2s(machine.encode(), digest_size=2).hexdigest()
    return PORT_PREFIX + machine[: IFNAMSIZ - len(PORT_PREFIX) - 4] + digest
