"""The state file: what `flowshift live up` created, so `live down` removes exactly that.

It is written before each step that creates something (so a crash of `up` or of the daemon leaves
a complete record) and replaced atomically. Its existence is the one-host lock: `up` creates it
with O_EXCL.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any

import msgspec

from flowshift.live.names import LiveError, Names

VERSION = 1


class PortState(msgspec.Struct, frozen=True):
    """One veth as the daemon needs it: its fs-host end and the peer's MAC."""

    ifname: str  # in fs-host
    mac: str  # of ifname: the source of frames sent out of it
    peer_mac: str  # of the far end (the machine's or the wire's eth0): their destination
    machine: str = ""  # "" for the uplink


class LiveState(msgspec.Struct):
    version: int
    suffix: str
    config_path: str
    config: dict[str, Any]  # config.to_dict of the loaded config: the daemon parses it back
    netns: list[str] = []  # namespaces created, in order
    ports: list[PortState] = []  # one per machine, in config order
    uplink: PortState | None = None
    pid: int = 0  # the daemon's
    metrics_port: int = 0  # 0: no metrics endpoint
    ready: bool = False
    pnic: bool = False  # the eBPF datapath is attached (the daemon loads it)
    pins: str = ""  # its pin directory under /sys/fs/bpf, removed by `down`


def create(names: Names, state: LiveState) -> None:
    """Take the lock: fail with a one-line error when a live host is already up."""
    names.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(names.state, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pid = ""
        with contextlib.suppress(LiveError):
            pid = f" (daemon pid {load(names).pid})"
        raise LiveError(f"a live host is already up{pid}, state in {names.state}: "
                        "`flowshift live down` removes it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.json.encode(state))


def save(names: Names, state: LiveState) -> None:
    tmp = names.state.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode(state))
    os.replace(tmp, names.state)


def load(names: Names) -> LiveState:
    return load_path(names.state)


def load_path(path: Path) -> LiveState:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LiveError("no live host is up") from None
    except OSError as err:
        raise LiveError(f"{path}: cannot read: {err.strerror}") from None
    try:
        return msgspec.json.decode(raw, type=LiveState)
    except msgspec.DecodeError as err:
        raise LiveError(f"{path}: not a live state file: {err}") from None


def remove(names: Names) -> None:
    """Remove the state file and the run directory's other files of ours."""
    for path in (names.state, names.state.with_suffix(".tmp"), names.control, names.log):
        path.unlink(missing_ok=True)
    try:
        names.run_dir.rmdir()
    except OSError as err:
        if err.errno not in (errno.ENOENT, errno.ENOTEMPTY):
            raise
