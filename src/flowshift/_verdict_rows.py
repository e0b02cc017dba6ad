"""The rows of the verdicts file, formatted by a compiled loop (replay.py writes them).

A row is `index,time,machine,direction,verdict,reason,tier,out_index`. Everything between the
time and the out_index depends only on the packet's result code, so it is formatted once per
code (`middles`) and copied; the numbers are written digit by digit. The text is exactly what
`seconds_text` and Python's `str(int)` give. The serial replay and the merge of a sharded one
(shard_merge.py) both write their rows with `rows_bytes`, so their files are the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from flowshift.packet._records import _copy_bytes
from flowshift.tiers._pnic_mem import cached

NS_PER_S = 1_000_000_000
# A shard's rows as data instead of text (replay's `row_data`, merged by shard_merge.py), one
# record per packet in its order: its time, the number of its middle in the shard's table of
# middles (written beside, `middles_path`), and the bytes of its output record (16 + captured
# length) when it left, 0 when it did not.
ROW_DATA = np.dtype([("ts", "<i8"), ("middle", "<i4"), ("record", "<u4")])
# the most bytes a row takes besides its middle: two 20-digit numbers, a sign, a 19-digit
# time with its point, and three separators
ROW_BYTES = 20 + 1 + 1 + 19 + 1 + 9 + 20 + 1


def seconds_text(delta_ns: int) -> str:
    """Nanoseconds as seconds with 9 decimals, exactly (no float rounding)."""
    sign = "-" if delta_ns < 0 else ""
    s, ns = divmod(abs(delta_ns), NS_PER_S)
    return f"{sign}{s}.{ns:09d}"


@cached()
def _digits(out, pos, v):
    """Decimal digits of v >= 0 at out[pos:]; the position after them."""
    k = 1
    t = v // 10
    while t:
        t //= 10
        k += 1
    end = pos + k
    p = end
    while True:
        p -= 1
        out[p] = 48 + v % 10
        v //= 10
        if not v:
            break
    return end


@cached(nogil=True)  # a sharded merge formats while it copies packets
def format_rows(index0, rel_ns, middle, table, starts, out_index, out):
    """Row i: index0 + i, rel_ns[i] as seconds with 9 decimals, table[starts[m]:starts[m+1]]
    for m = middle[i] (it brings the commas around it), out_index[i] unless negative.
    Returns the bytes written to `out`. rel_ns must be above the int64 minimum."""
    pos = 0
    for i in range(len(rel_ns)):
        pos = _digits(out, pos, index0 + i)
        out[pos] = 44  # ,
        pos += 1
        t = rel_ns[i]
        if t < 0:
            out[pos] = 45  # -
            pos += 1
            t = -t
        pos = _digits(out, pos, t // NS_PER_S)
        out[pos] = 46  # .
        ns = t % NS_PER_S
        for k in range(9, 0, -1):
            out[pos + k] = 48 + ns % 10
            ns //= 10
        pos += 10
        m = middle[i]
        n = starts[m + 1] - starts[m]
        _copy_bytes(out, pos, table, starts[m], n)
        pos += n
        if out_index[i] >= 0:
            pos = _digits(out, pos, out_index[i])
        out[pos] = 10  # newline
        pos += 1
    return pos


def rows_text(index0: int, ts: np.ndarray, first_ts: int, middle: np.ndarray,
              middles: list[bytes], out_index: np.ndarray) -> memoryview | None:
    """The rows of one batch as UTF-8 bytes; None when a time is too far from `first_ts` for
    int64 nanoseconds (the caller formats those in Python)."""
    n = len(ts)
    if not n:
        return memoryview(b"")
    if not (int(ts.min()) - first_ts > -(1 << 63) and int(ts.max()) - first_ts < 1 << 63):
        return None
    table = np.frombuffer(b"".join(middles), np.uint8)
    starts = np.zeros(len(middles) + 1, np.int64)
    np.cumsum([len(m) for m in middles], out=starts[1:])
    out = np.empty(n * (ROW_BYTES + max(len(m) for m in middles)), np.uint8)
    size = format_rows(index0, ts - np.int64(first_ts), middle.astype(np.int64), table, starts,
                       out_index.astype(np.int64), out)
    return out[:size].data


def rows_bytes(index0: int, ts: np.ndarray, first_ts: int, middle: np.ndarray,
               middles: list[bytes], out_index: np.ndarray) -> bytes | memoryview:
    """The rows of one batch: compiled, or in Python when a time is too far from `first_ts`
    for int64 nanoseconds."""
    text = rows_text(index0, ts, first_ts, middle, middles, out_index)
    if text is not None:
        return text
    return b"".join(
        b"%d,%s%s%s\n" % (index0 + i, seconds_text(t - first_ts).encode(), middles[m],
                          b"%d" % o if o >= 0 else b"")
        for i, (t, m, o) in enumerate(zip(ts.tolist(), middle.tolist(), out_index.tolist(),
                                          strict=True)))


def middles_path(row_data: str | os.PathLike[str]) -> Path:
    """Where the middles of a `row_data` file are (JSON: a list of strings, by number)."""
    p = Path(row_data)
    return p.with_name(p.name + ".middles.json")
