"""The second cache's exact-match index, compiled: open addressing on numpy arrays.

Each entry is found by two keys, its original key (direction 0) and its reply key, the reverse
of its rewrite (direction 1). A key is five int64 words: (family | proto << 8 | zone << 16 |
sport << 32 | dport << 48, src as two big-endian words, dst as two). The table holds the words
and `slot * 2 + direction` (-1: empty); linear probing, deletion by backward shift (no
tombstones, so lookups never slow down under churn). The size is a power of two at least twice
the number of keys, so a probe always ends at an empty bucket.

Entries are the cache's bytes, E_SIZE per slot, in the ENTRY_DTYPE layout; the offsets below
are taken from it.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numba
import numpy as np

from flowshift import entry
from flowshift.tiers._pnic_mem import be32, be64, kernel, ld16, prefetch

if TYPE_CHECKING:
    from flowshift.flow import FlowKey

# ENTRY_DTYPE offsets the compiled code reads and writes (numba reads them as constants)
_FIELDS = entry.field_offsets()
E_FAMILY = _FIELDS["family"]
E_PROTO = _FIELDS["proto"]
E_ZONE = _FIELDS["zone"]
E_SPORT = _FIELDS["sport"]
E_DPORT = _FIELDS["dport"]
E_SRC = _FIELDS["src"]
E_DST = _FIELDS["dst"]
E_XSRC = _FIELDS["xsrc"]
E_XDST = _FIELDS["xdst"]
E_XSPORT = _FIELDS["xsport"]
E_XDPORT = _FIELDS["xdport"]
E_SIZE = entry.ENTRY_SIZE  # entry i starts at byte i * E_SIZE of the cache

EMPTY = -1
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64 (Fibonacci hashing)


@kernel()
def addr_words(mem, i, family):
    """A 16-byte address field as two big-endian words (IPv4: only its 4 bytes count)."""
    if family == 4:
        return be32(mem, i) << 32, np.int64(0)
    return be64(mem, i), be64(mem, i + 8)


@kernel()
def head_word(family, proto, zone, sport, dport):
    return family | (proto << 8) | (zone << 16) | (sport << 32) | (dport << 48)


@kernel(private=True)
def _key(mem, e, src, dst, sport, dport):
    """The key of the entry at mem[e] with these address fields and ports."""
    family = numba.int64(mem[e + E_FAMILY])
    s_hi, s_lo = addr_words(mem, e + src, family)
    d_hi, d_lo = addr_words(mem, e + dst, family)
    head = head_word(family, numba.int64(mem[e + E_PROTO]), ld16(mem, e + E_ZONE),
                     ld16(mem, e + sport), ld16(mem, e + dport))
    return head, s_hi, s_lo, d_hi, d_lo


@kernel()
def entry_key(mem, e):
    """The original key of the entry at mem[e]."""
    return _key(mem, e, np.int64(E_SRC), np.int64(E_DST), np.int64(E_SPORT), np.int64(E_DPORT))


@kernel()
def entry_reply_key(mem, e):
    """The reply key of the entry at mem[e]: the reverse of its rewrite."""
    return _key(mem, e, np.int64(E_XDST), np.int64(E_XSRC), np.int64(E_XDPORT),
                np.int64(E_XSPORT))


@kernel(private=True)
def _home(w0, w1, w2, w3, w4, mask):
    h = np.int64(0)
    for w in (w0, w1, w2, w3, w4):
        h = (h ^ w) * _GOLDEN
        h ^= (h >> 29) & np.int64(0x7FFFFFFFF)
    return h & mask


@kernel(private=True)
def _same(keys, j, w0, w1, w2, w3, w4):
    return (keys[j, 0] == w0 and keys[j, 1] == w1 and keys[j, 2] == w2 and keys[j, 3] == w3
            and keys[j, 4] == w4)


@kernel()
def lookup(keys, vals, w0, w1, w2, w3, w4):
    """slot * 2 + direction of a key, or -1."""
    mask = len(vals) - 1
    j = _home(w0, w1, w2, w3, w4, mask)
    while vals[j] != EMPTY:
        if _same(keys, j, w0, w1, w2, w3, w4):
            return vals[j]
        j = (j + 1) & mask
    return EMPTY


@kernel(private=True)
def _put(keys, vals, key, value):
    mask = len(vals) - 1
    j = _home(key[0], key[1], key[2], key[3], key[4], mask)
    while vals[j] != EMPTY:
        j = (j + 1) & mask
    for k in range(5):
        keys[j, k] = key[k]
    vals[j] = value


@kernel(private=True)
def _delete(keys, vals, key):
    mask = len(vals) - 1
    i = _home(key[0], key[1], key[2], key[3], key[4], mask)
    while True:
        if vals[i] == EMPTY:
            return
        if _same(keys, i, key[0], key[1], key[2], key[3], key[4]):
            break
        i = (i + 1) & mask
    j = i
    while True:
        j = (j + 1) & mask
        if vals[j] == EMPTY:
            break
        home = _home(keys[j, 0], keys[j, 1], keys[j, 2], keys[j, 3], keys[j, 4], mask)
        # the bucket at j may move back to the hole at i unless its home lies in (i, j]
        if (i <= j and i < home <= j) or (i > j and (home > i or home <= j)):
            continue
        for k in range(5):
            keys[i, k] = keys[j, k]
        vals[i] = vals[j]
        i = j
    vals[i] = EMPTY


@kernel()
def index_insert(mem, slot, keys, vals):
    """Index both keys of the entry in slot; False if either is taken (or they are one)."""
    e = slot * E_SIZE
    key = entry_key(mem, e)
    reply = entry_reply_key(mem, e)
    if key == reply:
        return False
    if lookup(keys, vals, *key) != EMPTY or lookup(keys, vals, *reply) != EMPTY:
        return False
    _put(keys, vals, key, slot * 2)
    _put(keys, vals, reply, slot * 2 + 1)
    return True


@kernel()
def index_remove(mem, slot, keys, vals):
    e = slot * E_SIZE
    _delete(keys, vals, entry_key(mem, e))
    _delete(keys, vals, entry_reply_key(mem, e))


def table_size(capacity: int) -> int:
    """A power of two at least 2 * 2 * capacity: two keys per entry, load at most one half."""
    return 1 << max(3, (4 * capacity - 1).bit_length())


def empty_index(capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """The words and values of an empty index for `capacity` entries (table_size buckets)."""
    size = table_size(capacity)
    return np.zeros((size, 5), np.int64), np.full(size, EMPTY, np.int64)


def key_words(key: FlowKey) -> tuple[int, int, int, int, int]:
    """A flow key as the index keeps it: five words, each the int64 bit pattern of its
    unsigned value."""
    family, proto, zone, src, dst, sport, dport = key
    head = family | proto << 8 | zone << 16 | sport << 32 | dport << 48
    if head >> 63:
        head -= 1 << 64
    if len(src) == 4:  # an IPv4 address is the top half of its first word, read signed
        return (head, int.from_bytes(src, "big", signed=True) << 32, 0,
                int.from_bytes(dst, "big", signed=True) << 32, 0)
    return (head, *_signed_words(src), *_signed_words(dst))


_WORDS = struct.Struct(">qq")


def _signed_words(addr: bytes) -> tuple[int, int]:
    """address_words as int64 bit patterns (struct reads them signed: no arithmetic)."""
    words: tuple[int, int] = _WORDS.unpack(addr.ljust(16, b"\0"))
    return words


def address_words(addr: bytes) -> tuple[int, int]:
    """An address as two big-endian words, as the index and the parser keep it."""
    return divmod(int.from_bytes(addr.ljust(16, b"\0"), "big"), 1 << 64)


INSERTED, NO_ROOM, KEY_TAKEN = 0, 1, 2  # what index_insert_rows says of each row


@kernel(inline=False)
def index_insert_rows(mem, rows, free, keys, vals, state, live, codes):
    """Insert entries (`rows`: their bytes back to back) in order, each as `index_insert`
    would one by one: a row goes to the next slot of `free` not used yet, its bytes copied in
    and both keys indexed, and `state[slot] = live`; codes[i]: INSERTED, NO_ROOM (every slot
    of `free` used) or KEY_TAKEN (a key is present, an earlier row's included: the slot is
    cleared again). The number of slots used, from the start of `free`."""
    n = len(codes)
    mask = len(vals) - 1
    for i in range(n):  # the buckets of every key first: their cache lines load meanwhile
        for w in (entry_key(rows, i * E_SIZE), entry_reply_key(rows, i * E_SIZE)):
            j = _home(w[0], w[1], w[2], w[3], w[4], mask)
            prefetch(vals, j)
            prefetch(keys[j], 0)
    used = 0
    for i in range(n):
        if used == len(free):
            codes[i] = NO_ROOM
            continue
        slot = free[used]
        e = slot * E_SIZE
        for b in range(E_SIZE):
            mem[e + b] = rows[i * E_SIZE + b]
        if index_insert(mem, slot, keys, vals):
            state[slot] = live
            codes[i] = INSERTED
            used += 1
        else:
            for b in range(E_SIZE):
                mem[e + b] = 0
            codes[i] = KEY_TAKEN
    return used


@kernel()
def reindex(mem, state, live, keys, vals):
    """Index every slot whose state is `live` into an empty index (a table that grew); False
    if one clashed."""
    for slot in range(len(state)):
        if state[slot] == live and not index_insert(mem, slot, keys, vals):
            return False
    return True


@kernel()
def update_keys(keys, vals, words, gone):
    """An index of keys alone (value 0): words[:gone] leave it, words[gone:] join it (each row
    a key's five words; a key joins only when absent, leaves only when present)."""
    for i in range(len(words)):
        key = (words[i, 0], words[i, 1], words[i, 2], words[i, 3], words[i, 4])
        if i < gone:
            _delete(keys, vals, key)
        else:
            _put(keys, vals, key, np.int64(0))
