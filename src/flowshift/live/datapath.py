"""The eBPF datapath's control API: build, load, pin, attach, map operations, test runs.

One `Datapath` is the PNIC of one live host: its program (bpf/pnic.c) loaded once, its maps
pinned under /sys/fs/bpf/fs-<name>/ so that the VNIC daemon can open them by path, and the
tc (clsact) ingress filters it attached. `close()` (or leaving the `with` block) detaches
every filter it attached, removes the clsact qdiscs it created, and unpins exactly what it
pinned. docs/datapath.md describes the maps, the verdicts and the handoff protocol.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING

from flowshift.closing import Closing
from flowshift.entry import ENTRY_SIZE
from flowshift.flow import FlowKey
from flowshift.live import bpfsys, build
from flowshift.live.libbpf import BpfObject
from flowshift.verdict import PuntReason

if TYPE_CHECKING:
    from flowshift.config import MachineConfig
    from flowshift.host import Classifier

BPFFS = Path("/sys/fs/bpf")
KEY_SIZE = 40  # struct flow_key: the first 40 bytes of the entry
MAX_RANGES = 64  # pnic_maps.h
MAX_PUBLIC = 64
MAX_PORTS = 257
PROGRAM = "pnic_ingress"
HOLD_PROGRAM = "hold_ctl"
MAPS = ("fs_flows", "fs_replies", "fs_holds", "fs_config", "fs_ports", "fs_punts")
_SIZED = ("fs_flows", "fs_replies", "fs_holds")  # max_entries = the capacity

# struct __sk_buff offsets (include/uapi/linux/bpf.h) that BPF_PROG_TEST_RUN takes and gives
_SKB_SIZE = 192
_SKB_CB = 48
_SKB_TSTAMP = 152

TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7
_HOLD_OPS = {"handled": 1, "release": 2, "read": 3}
_FLOW_KEY = struct.Struct("<BBHHH16s16s")


class Mode(IntEnum):
    FAST = 0  # the fast path runs the second cache
    PUNT_ALL = 1  # a withdrawn PNIC: every packet goes to the VNIC (PuntReason.MISS)


class Clock(IntEnum):
    MONO = 0  # bpf_ktime_get_ns(): entry times are CLOCK_MONOTONIC ns (the live runtime)
    TSTAMP = 1  # skb->tstamp: each test run carries its packet's time (trace time)


class Hold(IntEnum):
    FAST = 0  # released: the fast path runs the flow
    HELD = 1  # in transit: packets are punted as PuntReason.HELD and counted in flight
    RETURNED = 2  # the datapath handed the flow back (LIFE, EXPIRED, UNSUPPORTED)


class Result(IntEnum):
    """What the program did with a packet (skb->cb[0] after a test run)."""

    FORWARD = 1
    DROP = 2
    PUNT = 3


@dataclass(frozen=True, slots=True)
class Port:
    """An egress port: its device and the Ethernet addresses a forwarded frame gets."""

    ifindex: int
    src_mac: bytes = b"\0" * 6
    dst_mac: bytes = b"\0" * 6

    def pack(self) -> bytes:
        if len(self.src_mac) != 6 or len(self.dst_mac) != 6:
            raise ValueError(f"port {self.ifindex}: MAC addresses have 6 bytes")
        return struct.pack("<I6s6s", self.ifindex, self.src_mac, self.dst_mac)


@dataclass(frozen=True, slots=True)
class Run:
    """One BPF_PROG_TEST_RUN of the ingress program."""

    retval: int  # TC_ACT_*
    frame: bytes  # the frame after the program
    result: Result
    code: int  # Reason (FORWARD/DROP) or PuntReason (PUNT)
    ifindex: int  # the device redirected to
    machine: int
    direction: int  # 0 egress, 1 ingress
    duration_ns: int  # mean per run with repeat


def key_bytes(key: FlowKey | bytes) -> bytes:
    """A flow key as struct flow_key (the entry's first 40 bytes)."""
    if isinstance(key, bytes):
        if len(key) != KEY_SIZE:
            raise ValueError(f"a flow key has {KEY_SIZE} bytes, not {len(key)}")
        return key
    return _FLOW_KEY.pack(key.family, key.proto, key.zone, key.sport, key.dport,
                          key.src.ljust(16, b"\0"), key.dst.ljust(16, b"\0"))


def reply_key(entry: bytes) -> bytes:
    """The reply key of an entry: the reverse of its rewrite (xsrc, xdst, xsport, xdport)."""
    family, proto, zone = entry[0], entry[1], entry[2:4]
    xsrc, xdst = entry[40:56], entry[56:72]
    xsport, xdport = entry[72:74], entry[74:76]
    return bytes([family, proto]) + zone + xdport + xsport + xdst + xsrc


def _config(mode: Mode, clock: Clock, punt_ifindex: int, tag_punts: bool,
            classifier: Classifier) -> bytes:
    """struct fs_config from the classifier's ranges and public addresses."""
    if len(classifier.inside) > MAX_RANGES or len(classifier.public) > MAX_PUBLIC:
        raise ValueError(f"the datapath holds {MAX_RANGES} address ranges and {MAX_PUBLIC} "
                         f"public addresses, not {len(classifier.inside)} and "
                         f"{len(classifier.public)}")
    m64 = (1 << 64) - 1
    ranges = b"".join(struct.pack("<IIQQQQ", fam, m, lo >> 64, lo & m64, hi >> 64, hi & m64)
                      for fam, lo, hi, m in classifier.inside)
    public = b""
    for addr, m in classifier.public.items():
        v = int.from_bytes(addr.ljust(16, b"\0"), "big")
        public += struct.pack("<IIQQ", 4 if len(addr) == 4 else 6, m, v >> 64, v & m64)
    head = struct.pack("<6I", mode, clock, punt_ifindex, int(tag_punts), len(classifier.inside),
                       len(classifier.public))
    return (head + ranges.ljust(40 * MAX_RANGES, b"\0") + public.ljust(24 * MAX_PUBLIC, b"\0"))


class Datapath(Closing):
    """The PNIC's eBPF datapath: one loaded program, its pinned maps, its tc attachments."""

    @staticmethod
    def build() -> Path:
        """The compiled object (built now, or from the cache)."""
        return build.build()

    def __init__(self, name: str, capacity: int,
                 machines: Classifier | Sequence[MachineConfig], *, uplink: Port,
                 machine_ports: Sequence[Port], punt_ifindex: int, clock: Clock = Clock.MONO,
                 tag_punts: bool = True, mode: Mode = Mode.FAST, bpffs: Path = BPFFS) -> None:
        if not name or "/" in name:
            raise ValueError(f"datapath name {name!r}: a non-empty name without '/'")
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        if len(machine_ports) > MAX_PORTS - 1:
            raise ValueError(f"at most {MAX_PORTS - 1} machine ports, not {len(machine_ports)}")
        self.name = name
        self.capacity = capacity
        self.pin_dir = bpffs / f"fs-{name}"
        self._pinned: list[Path] = []
        self._attached: list[tuple[str | None, str, bool]] = []  # (netns, ifname, made clsact)
        self._mode, self._clock, self._punt, self._tag = mode, clock, punt_ifindex, tag_punts
        from flowshift.host import Classifier  # host.py wires tiers together: import late

        self._classifier = (machines if isinstance(machines, Classifier)
                            else Classifier(tuple(machines)))
        self._cpus = bpfsys.possible_cpus()
        self._obj = BpfObject(self.build())
        try:
            for sized in _SIZED:
                self._obj.set_max_entries(sized, capacity)
            self._obj.load()
            self.fd = {m: self._obj.map_fd(m) for m in MAPS}
            self.prog_fd = self._obj.prog_fd(PROGRAM)
            self._hold_fd = self._obj.prog_fd(HOLD_PROGRAM)
            self._write_config()
            self._set(self.fd["fs_ports"], 0, uplink.pack())
            for m, port in enumerate(machine_ports):
                self._set(self.fd["fs_ports"], 1 + m, port.pack())
            self._pin_all(bpffs)
        except BaseException:
            self.close()
            raise

    # -- lifecycle ---------------------------------------------------------------------------

    def _pin_all(self, bpffs: Path) -> None:
        _ensure_bpffs(bpffs)
        self.pin_dir.mkdir(mode=0o700)  # an existing one is another datapath's: refuse
        self._pinned.append(self.pin_dir)
        for name, fd in (*self.fd.items(), (PROGRAM, self.prog_fd),
                         (HOLD_PROGRAM, self._hold_fd)):
            path = self.pin_dir / name
            bpfsys.pin(fd, path)
            self._pinned.append(path)

    def close(self) -> None:
        """Detach every filter attached, unpin everything pinned, unload."""
        errors = []
        for netns, ifname, made in reversed(self._attached):
            try:
                _tc_detach(netns, ifname, made)
            except Exception as e:  # keep tearing down; report the first failure
                errors.append(e)
        self._attached.clear()
        for path in reversed(self._pinned):
            try:
                if path == self.pin_dir:
                    path.rmdir()
                else:
                    path.unlink()
            except FileNotFoundError:
                pass
        self._pinned.clear()
        if getattr(self, "_obj", None) is not None:
            self._obj.close()
        if errors:
            raise errors[0]

    # -- attachment --------------------------------------------------------------------------

    def attach(self, ifname: str, netns: str | None = None) -> None:
        """Attach the program at tc clsact ingress of ifname (in the named network namespace)."""
        made = _tc_attach(netns, ifname, self.prog_fd, f"fs-{self.name}")
        self._attached.append((netns, ifname, made))

    def detach(self, ifname: str, netns: str | None = None) -> None:
        for i, (ns, name, made) in enumerate(self._attached):
            if (ns, name) == (netns, ifname):
                del self._attached[i]
                _tc_detach(ns, name, made)
                return
        raise KeyError(f"not attached to {ifname} in {netns or 'this namespace'}")

    # -- configuration -----------------------------------------------------------------------

    def _write_config(self) -> None:
        self._set(self.fd["fs_config"], 0, _config(self._mode, self._clock, self._punt,
                                                   self._tag, self._classifier))

    def _set(self, fd: int, index: int, value: bytes) -> None:
        bpfsys.update(fd, struct.pack("<I", index), value)

    def set_mode(self, mode: Mode) -> None:
        """FAST, or PUNT_ALL for a withdrawn PNIC (every packet to the VNIC)."""
        self._mode = Mode(mode)
        self._write_config()

    def set_port(self, index: int, port: Port) -> None:
        """Port 0 the uplink, 1 + m machine m's port."""
        if not 0 <= index < MAX_PORTS:
            raise ValueError(f"port index {index} outside 0..{MAX_PORTS - 1}")
        self._set(self.fd["fs_ports"], index, port.pack())

    # -- the second cache --------------------------------------------------------------------

    def insert(self, entry: bytes, *, held: bool = False) -> bool:
        """Add an entry under both its keys, with its hold record; False when full or a key is
        already present.

        held: the flow starts HELD (see docs/datapath.md, the handoff): its packets are punted
        and counted until `release` finds every one of them handled.
        """
        if len(entry) != ENTRY_SIZE:
            raise ValueError(f"a flow entry has {ENTRY_SIZE} bytes, not {len(entry)}")
        key, rkey = entry[:KEY_SIZE], reply_key(entry)
        flows, replies, holds = (self.fd[m] for m in ("fs_flows", "fs_replies", "fs_holds"))
        if key == rkey:
            return False
        for k in (key, rkey):
            if (bpfsys.lookup(flows, k, ENTRY_SIZE) is not None
                    or bpfsys.lookup(replies, k, KEY_SIZE) is not None):
                return False
        # the flow's record (its lock, its hold state) goes in first: no packet ever finds the
        # entry without it, nor a held flow's entry unheld
        try:
            if not bpfsys.update(holds, key, _hold(Hold.HELD if held else Hold.FAST),
                                 bpfsys.NOEXIST):
                return False
        except bpfsys.BpfError as e:
            if e.errno == errno.E2BIG:  # full
                return False
            raise
        try:
            if not bpfsys.update(flows, key, entry, bpfsys.NOEXIST):
                raise _Refused
            if not bpfsys.update(replies, rkey, key, bpfsys.NOEXIST):
                bpfsys.delete(flows, key)
                raise _Refused
        except (_Refused, bpfsys.BpfError) as e:
            bpfsys.delete(holds, key)
            if isinstance(e, bpfsys.BpfError) and e.errno != errno.E2BIG:
                raise
            return False
        return True

    def get(self, key: FlowKey | bytes) -> bytes | None:
        """The entry whose original key is key."""
        return bpfsys.lookup(self.fd["fs_flows"], key_bytes(key), ENTRY_SIZE)

    def remove(self, key: FlowKey | bytes) -> bytes | None:
        """Take the entry out (with its reply key and hold record): its exact bytes."""
        k = key_bytes(key)
        entry = self.get(k)
        if entry is None:
            return None
        bpfsys.delete(self.fd["fs_replies"], reply_key(entry))
        bpfsys.delete(self.fd["fs_flows"], k)
        bpfsys.delete(self.fd["fs_holds"], k)
        return entry

    def update(self, entry: bytes) -> bool:
        """Rewrite an existing entry (a HELD flow's state as the VNIC advances it)."""
        if len(entry) != ENTRY_SIZE:
            raise ValueError(f"a flow entry has {ENTRY_SIZE} bytes, not {len(entry)}")
        return bpfsys.update(self.fd["fs_flows"], entry[:KEY_SIZE], entry, bpfsys.EXIST)

    def keys(self) -> Iterator[bytes]:
        k: bytes | None = None
        while (k := bpfsys.next_key(self.fd["fs_flows"], k, KEY_SIZE)) is not None:
            yield k

    def entries(self) -> Iterator[bytes]:
        for k in list(self.keys()):
            e = self.get(k)
            if e is not None:
                yield e

    def clear(self) -> None:
        """Take every entry, reply key and hold record out."""
        for name in ("fs_flows", "fs_replies", "fs_holds"):
            fd = self.fd[name]
            while (k := bpfsys.next_key(fd, None, KEY_SIZE)) is not None:
                bpfsys.delete(fd, k)

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def returned(self) -> list[bytes]:
        """Original keys of the flows the datapath handed back, not yet taken."""
        out = []
        for k in list(self.keys()):
            if self.hold_state(k)[0] == Hold.RETURNED:
                out.append(k)
        return out

    # -- the handoff -------------------------------------------------------------------------

    def _hold_op(self, key: FlowKey | bytes, op: str) -> int:
        ctx = key_bytes(key) + struct.pack("<II", _HOLD_OPS[op], 0)
        run = bpfsys.test_run(self._hold_fd, None, ctx, ctx_out_size=0)  # syscall: no ctx_out
        return ctypes.c_int32(run.retval).value

    def hold_state(self, key: FlowKey | bytes) -> tuple[Hold, int]:
        """(state, punts in flight); (FAST, 0) for a flow without a hold record."""
        v = self._hold_op(key, "read")
        if v < 0:
            return Hold.FAST, 0
        return Hold(v >> 16), v & 0xFFFF

    def handled(self, key: FlowKey | bytes) -> int:
        """The VNIC handled one HELD punt of the flow: the punts still in flight (-1: none)."""
        return self._hold_op(key, "handled")

    def release(self, key: FlowKey | bytes) -> bool:
        """Switch a HELD flow to the fast path if no punt of it is in flight (atomic with the
        datapath's counting); False: some are, handle them first."""
        return self._hold_op(key, "release") == 1

    # -- counters ----------------------------------------------------------------------------

    def _percpu(self, index: int) -> int:
        raw = bpfsys.lookup(self.fd["fs_punts"], struct.pack("<I", index), 8 * self._cpus)
        return 0 if raw is None else sum(struct.unpack(f"<{self._cpus}Q", raw))

    def punt_counts(self) -> dict[PuntReason, int]:
        return {r: self._percpu(int(r)) for r in PuntReason}

    def forwarded(self) -> int:
        return self._percpu(0)

    def dropped(self) -> int:
        return self._percpu(max(PuntReason) + 1)

    # -- test runs ---------------------------------------------------------------------------

    def test_run(self, frame: bytes, *, ts: int = 0, repeat: int = 0) -> Run:
        """Run the ingress program on one Ethernet frame (BPF_PROG_TEST_RUN); ts is the
        packet's time when the datapath's clock is Clock.TSTAMP."""
        ctx = bytearray(_SKB_SIZE)
        struct.pack_into("<Q", ctx, _SKB_TSTAMP, ts)
        run = bpfsys.test_run(self.prog_fd, frame, bytes(ctx), repeat=repeat)
        kind, code, ifindex, machine, direction = struct.unpack_from("<5I", run.ctx, _SKB_CB)
        return Run(run.retval, run.data, Result(kind), code, ifindex, machine, direction,
                   run.duration_ns)


class _Refused(Exception):
    pass


def _hold(state: Hold) -> bytes:
    return struct.pack("<IIII", 0, state, 0, 0)  # lock, state, inflight, reserved


def _ensure_bpffs(root: Path) -> None:
    """Mount the BPF filesystem at root if nothing is mounted there (as systemd does)."""
    with open("/proc/self/mounts") as f:
        if any(line.split()[1] == str(root) and line.split()[2] == "bpf" for line in f):
            return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", os.fsencode(root), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount bpf at {root}: {os.strerror(err)}")


def _ipr(netns: str | None):  # type: ignore[no-untyped-def]
    from pyroute2 import IPRoute, NetNS  # type: ignore[import-untyped]

    return NetNS(netns) if netns else IPRoute()


_CLSACT_INGRESS = 0xFFFFFFF2
_FILTER_PRIO = 1
_FILTER_HANDLE = 1


def _tc_attach(netns: str | None, ifname: str, prog_fd: int, label: str) -> bool:
    """Add clsact (unless there is one) and our filter; True when we added the clsact."""
    with _ipr(netns) as ipr:
        links = ipr.link_lookup(ifname=ifname)
        if not links:
            raise KeyError(f"no interface {ifname} in {netns or 'this namespace'}")
        index = links[0]
        made = False
        try:
            ipr.tc("add", "clsact", index=index)
            made = True
        except Exception as e:  # pyroute2's NetlinkError
            if getattr(e, "code", None) != errno.EEXIST:
                raise
        try:
            ipr.tc("add-filter", "bpf", index=index, handle=_FILTER_HANDLE, fd=prog_fd,
                   name=label, parent=_CLSACT_INGRESS, prio=_FILTER_PRIO, protocol=0x0003,
                   direct_action=True)
        except BaseException:
            if made:
                ipr.tc("del", "clsact", index=index)
            raise
        return made


def _tc_detach(netns: str | None, ifname: str, made: bool) -> None:
    with _ipr(netns) as ipr:
        links = ipr.link_lookup(ifname=ifname)
        if not links:
            return  # the device is gone, and its filters with it
        index = links[0]
        if made:
            ipr.tc("del", "clsact", index=index)  # takes our filter with it
        else:
            ipr.tc("del-filter", "bpf", index=index, handle=_FILTER_HANDLE,
                   parent=_CLSACT_INGRESS, prio=_FILTER_PRIO, protocol=0x0003)
