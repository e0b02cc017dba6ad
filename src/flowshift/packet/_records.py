"""Compiled copies of frame bytes: gathering frames into a batch and packing pcap records.

Shared by the batch reader (batch.py) and the pcap writer (pcap.py), which import nothing of
each other.
"""

from __future__ import annotations

from numba.core import cgutils, types
from numba.extending import intrinsic

from flowshift.tiers._pnic_mem import cached


@intrinsic
def _copy_bytes(typingctx, dst, dst_pos, src, src_pos, n):
    """memcpy(dst + dst_pos, src + src_pos, n) for uint8 arrays, unchecked: numba's slice
    assignment copies byte by byte, ten times slower. Callers keep the ranges in bounds."""
    sig = types.void(dst, types.intp, src, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        dst_arr, dst_pos, src_arr, src_pos, n = args
        d = context.make_array(signature.args[0])(context, builder, dst_arr)
        s = context.make_array(signature.args[2])(context, builder, src_arr)
        to, frm = builder.gep(d.data, [dst_pos]), builder.gep(s.data, [src_pos])
        cgutils.raw_memcpy(builder, to, frm, n, 1)

    return sig, codegen



@cached()
def _put_u32(out, pos, v):
    out[pos] = v & 0xFF
    out[pos + 1] = (v >> 8) & 0xFF
    out[pos + 2] = (v >> 16) & 0xFF
    out[pos + 3] = (v >> 24) & 0xFF


@cached()
def pack_records(buf, offset, caplen, wire_len, ts, out):
    """Classic pcap records (nanosecond, little-endian) of the given frames, back to back in
    `out` (sized sum(16 + caplen)). Returns the bytes written."""
    pos = 0
    for i in range(len(offset)):
        sec = ts[i] // 1_000_000_000
        _put_u32(out, pos, sec)
        _put_u32(out, pos + 4, ts[i] - sec * 1_000_000_000)
        _put_u32(out, pos + 8, caplen[i])
        _put_u32(out, pos + 12, wire_len[i])
        _copy_bytes(out, pos + 16, buf, offset[i], caplen[i])
        pos += 16 + caplen[i]
    return pos


@cached(nogil=True)
def gather_records(src, src_pos, length, out):
    """Copies src[src_pos[i]:src_pos[i]+length[i]] for each i, back to back into `out`.
    Returns the bytes written."""
    pos = 0
    for i in range(len(src_pos)):
        _copy_bytes(out, pos, src, src_pos[i], length[i])
        pos += length[i]
    return pos
