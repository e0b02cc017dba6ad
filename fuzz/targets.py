"""Fuzz targets: one function per input format, each taking the fuzzer's bytes.

A target returns normally for any input that the code under test handles as documented
(parsed, or refused with its own error class); anything else escapes as an exception or an
`AssertionError` and is a finding. The same functions run under atheris (fuzz/run.py, the
long campaign) and under pytest without it (tests/test_fuzz.py, seeds plus random mutations).

- `parse`: the reference parser (packet/parse.py) against the PNIC engine's compiled parse
  kernel (tiers/_pnic_parse.py): both refuse, or both find the same headers, protocol, ports
  and flags; and the kernel reads nothing outside the captured bytes.
- `trace`: the per-frame trace reader (pcap and pcapng) against the batch reader (compiled for
  both): the same frames and the same problem; only `TraceError` escapes, and only when opening.
- `channel`: the channel decoder; only `ChannelError` escapes, and what decodes encodes back
  to a frame that decodes to the same message.
- `entry`: flow entry bytes -> Flow -> bytes keeps every byte the layout gives a meaning.
- `config`: TOML text -> parse_config; only `ConfigError` escapes, and a valid config survives
  to_dict -> parse_config unchanged.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from flowshift import channel
from flowshift.config import ConfigError, parse_config, to_dict
from flowshift.entry import ENTRY_DTYPE, ENTRY_SIZE, Flow
from flowshift.packet import batch as _batch_module
from flowshift.packet import pcap as _pcap_module
from flowshift.packet.batch import read_batches
from flowshift.packet.parse import parse
from flowshift.packet.pcap import TraceError, open_trace
from flowshift.packet.view import ParseError
from flowshift.tiers import _pnic_parse as kp

# -- the packet parsers, compared ---------------------------------------------------------

# the first input byte picks the link type (the ones both parsers read, and one neither does)
LINKTYPES = (1, 101, 12, 14, 228, 229, 113, 276, 0, 108, 147)
_PAD = 64  # bytes around the frame, filled twice with different junk: reads there show
_MASK64 = (1 << 64) - 1


def parse_input(linktype: int, frame: bytes, extra_wire: int = 0) -> bytes:
    """The `parse` target's input for one frame (the inverse of its decoding)."""
    return bytes([LINKTYPES.index(linktype), extra_wire & 0xFF]) + frame


def _kernel(frame: bytes, wire: int, linktype: int, junk: int) -> tuple[int, list[int]]:
    buf = np.full(len(frame) + 2 * _PAD, junk, np.uint8)
    buf[_PAD : _PAD + len(frame)] = np.frombuffer(frame, np.uint8)
    f = np.full(kp.N_FIELDS, -7, np.int64)
    status = kp.parse_frame(buf, _PAD, len(frame), wire, linktype, f)
    return int(status), f.tolist()


def _addr_words(addr: bytes) -> tuple[int, int]:
    if len(addr) == 4:
        return (int.from_bytes(addr, "big") << 32) & _MASK64, 0
    return int.from_bytes(addr[:8], "big"), int.from_bytes(addr[8:], "big")


def fuzz_parse(data: bytes) -> None:
    if len(data) < 2:
        return
    linktype = LINKTYPES[data[0] % len(LINKTYPES)]
    frame = data[2:]
    wire = len(frame) + (data[1] if data[1] < 200 else 0)  # often exactly as captured
    status, f = _kernel(frame, wire, linktype, 0x00)
    again = _kernel(frame, wire, linktype, 0xFF)
    assert again == (status, f), "the kernel read bytes outside the captured frame"
    ref = parse(bytearray(frame), linktype, wire)
    refused = ref.error != ParseError.OK or ref.inner is not None or ref.frag_offset > 0
    if refused:
        assert status == kp.FAIL, f"kernel parsed a frame the reference refuses ({ref.error!r})"
        return
    assert status != kp.FAIL, "kernel refused a frame the reference parses"
    v6_ext = ref.family == 6 and ref.l4 - ref.l3 != 40
    icmp_other = ref.proto in (1, 58) and ref.icmp_id < 0
    key_only = ref.frag or v6_ext or icmp_other
    assert (status == kp.KEY_ONLY) == key_only, f"status {status}, reference {ref}"
    fields = {
        kp.F_L3: ref.l3, kp.F_FAMILY: ref.family, kp.F_PROTO: ref.proto, kp.F_L4: ref.l4,
        kp.F_SPORT: ref.sport, kp.F_DPORT: ref.dport, kp.F_TOTAL: ref.ip_total,
        kp.F_L4LEN: ref.l4_len,
    }
    if status == kp.FULL and ref.proto == 6:
        fields.update({kp.F_SEQ: ref.seq, kp.F_ACK: ref.ack, kp.F_FLAGS: ref.flags,
                       kp.F_WINDOW: ref.window, kp.F_PAYLOAD: ref.payload_len})
    if status == kp.FULL and ref.proto in (1, 58):
        fields[kp.F_ECHO] = 1
    for i, want in fields.items():
        assert f[i] == want, f"field {i}: kernel {f[i]}, reference {want} ({ref})"
    words = (*_addr_words(ref.src), *_addr_words(ref.dst))
    got = tuple(f[i] & _MASK64 for i in (kp.F_SRC_HI, kp.F_SRC_LO, kp.F_DST_HI, kp.F_DST_LO))
    assert got == words, f"addresses: kernel {got}, reference {words}"


# -- the trace readers, compared ---------------------------------------------------------

_SCRATCH = Path(
    tempfile.mkdtemp(prefix="fs-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
)
_TRACE = _SCRATCH / "input.trace"
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
# small chunks for the bulk pcap decoder: records straddle chunk ends and outgrow a chunk, the
# paths a 4 MiB chunk reaches only with large traces (and a fresh 4 MiB buffer per input
# would cost more than the decoding)
FUZZ_CHUNK = 64  # bytes read at a time by both readers: records and blocks cross reads


def fuzz_trace(data: bytes) -> None:
    chunks = _batch_module.CHUNK, _pcap_module.CHUNK
    # for this input only: the modules are shared with tests
    _batch_module.CHUNK = _pcap_module.CHUNK = FUZZ_CHUNK
    try:
        _fuzz_trace(data)
    finally:
        _batch_module.CHUNK, _pcap_module.CHUNK = chunks


def _fuzz_trace(data: bytes) -> None:
    _TRACE.write_bytes(data)
    try:
        reader = open_trace(_TRACE)
    except TraceError:
        try:
            read_batches(_TRACE)
        except TraceError:
            return
        raise AssertionError("the batch reader opened a file the frame reader refuses") from None
    with reader:
        frame_objs = list(reader)
        problem = reader.problem
    frames = [(f.ts_ns, f.data, f.wire_len, f.linktype) for f in frame_objs]
    batched: list[tuple[int, bytes, int, int]] = []
    batch_problem = None
    batches = read_batches(_TRACE, batch_size=16)
    for batch in batches:
        batched += [(int(batch.ts_ns[i]), batch.frame(i), int(batch.wire_len[i]),
                     int(batch.linktype[i])) for i in range(len(batch))]
        batch_problem = batch.problem
    assert batched == frames, "the batch reader and the frame reader differ"
    assert batch_problem == problem, f"problem: batches {batch_problem!r}, frames {problem!r}"
    for ts, _, _, _ in frames:
        assert -(1 << 63) <= ts < 1 << 63


# -- the channel decoder -----------------------------------------------------------------


def fuzz_channel(data: bytes) -> None:
    try:
        msg = channel.decode(data)
    except channel.ChannelError:
        return
    validate = getattr(channel, "validate", None)  # content checks, where the module has them
    if validate is not None:
        try:
            validate(msg)
        except channel.ChannelError:
            return
    again = channel.decode(channel.encode(msg))
    assert again == msg, f"{msg!r} does not survive encode/decode"


def channel_input(body: bytes) -> bytes:
    """A frame with a good header around a fuzzed body, so mutations reach msgpack."""
    import struct
    import zlib

    return struct.pack("<HI", channel.VERSION, zlib.crc32(body)) + body


def fuzz_channel_frames(data: bytes) -> None:
    """Mostly a good header around fuzzed msgpack (a bad CRC stops everything else early);
    an input whose first byte is odd is taken as the whole frame."""
    if data[:1] and data[0] & 1:
        fuzz_channel(data[1:])
    else:
        fuzz_channel(channel_input(data[1:]))


# -- the flow entry codec ----------------------------------------------------------------


def _meaningful_mask(raw: bytes) -> np.ndarray:
    """Which bytes of an entry carry meaning: not the reserved bytes, not the address bytes
    past an IPv4 address, not the TCP block of a flow that is not TCP."""
    keep = np.ones(ENTRY_SIZE, bool)
    fields = ENTRY_DTYPE.fields
    assert fields is not None

    def clear(name: str, start: int = 0) -> None:
        dtype, offset = fields[name][:2]
        keep[offset + start : offset + dtype.itemsize] = False

    clear("reserved0")
    if raw[fields["family"][1]] == 4:
        for name in ("src", "dst", "xsrc", "xdst"):
            clear(name, 4)
    if raw[fields["proto"][1]] != 6:
        names = list(ENTRY_DTYPE.names or ())
        for name in names[names.index("tcp_state") : names.index("seen1") + 1]:
            clear(name)  # the TCP block: from tcp_state through seen1, in layout order
    return keep


def fuzz_entry(data: bytes) -> None:
    raw = data[:ENTRY_SIZE].ljust(ENTRY_SIZE, b"\0")
    out: bytes = Flow.from_bytes(raw).to_bytes()
    assert len(out) == ENTRY_SIZE
    keep = _meaningful_mask(raw)
    a, b = np.frombuffer(raw, np.uint8), np.frombuffer(out, np.uint8)
    bad = np.flatnonzero((a != b) & keep)
    assert not len(bad), f"entry bytes {bad.tolist()} changed on the way through Flow"
    again: bytes = Flow.from_bytes(out).to_bytes()
    assert again == out


# -- the config loader -------------------------------------------------------------------


def fuzz_config(data: bytes) -> None:
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
        return  # load_config's own errors; this target is about what follows
    try:
        cfg = parse_config(raw, "fuzz.toml")
    except ConfigError as e:
        assert "\n" not in str(e), "a config error of more than one line"
        return
    assert parse_config(to_dict(cfg), "again") == cfg, "the config does not survive to_dict"


TARGETS: dict[str, Callable[[bytes], None]] = {
    "parse": fuzz_parse,
    "trace": fuzz_trace,
    "channel": fuzz_channel_frames,
    "entry": fuzz_entry,
    "config": fuzz_config,
}
