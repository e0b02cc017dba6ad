"""Internet checksums (RFC 1071) and their incremental update (RFC 1624).

The full sum uses Python's big integers: a 16-bit ones'-complement sum equals the message read
as one big-endian integer modulo 0xFFFF (2**16 == 1 mod 0xFFFF), computed in C.
"""

from __future__ import annotations


def ones_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """16-bit ones'-complement sum of `data` (odd length padded with a zero byte) plus `initial`.

    Returns a value in 0..0xFFFF where 0xFFFF stands for ones'-complement zero of a non-empty sum.
    """
    n = len(data)
    v = int.from_bytes(data, "big")
    if n & 1:
        v <<= 8
    v += initial
    if v == 0:
        return 0
    r = v % 0xFFFF
    return r if r else 0xFFFF


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum field value for `data` (with its checksum field zeroed)."""
    return (~ones_sum(data, initial)) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Ones'-complement sum of the IPv4 or IPv6 pseudo-header (RFC 793 / RFC 8200 §8.1)."""
    if len(src) == 4:
        extra = bytes((0, proto)) + length.to_bytes(2, "big")
    else:
        extra = length.to_bytes(4, "big") + bytes((0, 0, 0, proto))
    return ones_sum(src + dst + extra)


def update_bytes(csum: int, old: bytes, new: bytes) -> int:
    """RFC 1624 update for a changed field of even length (an address: 4 or 16 bytes)."""
    return update_sum(csum, change_sum(old, new))


def change_sum(old: bytes, new: bytes) -> int:
    """~m + m' of RFC 1624 eqn. 3 for a changed field of even length: what `update_sum` adds.

    One change moves several checksums (an address: the IPv4 header's and the transport's), so
    it is summed once.
    """
    return change_of(ones_sum(old), ones_sum(new))


# The update itself, below, is its one statement: Python calls these functions and the PNIC
# kernels compile them (numba's register_jitable), so they use only what numba compiles too:
# integers, masks and loops.

def change_of(old_sum: int, new_sum: int) -> int:
    """~m + m' of RFC 1624 eqn. 3 from the ones'-complement sums of the old and new field."""
    return (~old_sum & 0xFFFF) + new_sum


def fold(s: int) -> int:
    """A sum of 16-bit terms folded to 16 bits with end-around carries: the same value modulo
    0xFFFF, 0 only when the sum is 0."""
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def update_sum(csum: int, change: int) -> int:
    """RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), with `change` from `change_sum` / `change_of`
    (or a sum of several: ones'-complement addition is associative)."""
    return ~fold((~csum & 0xFFFF) + change) & 0xFFFF


def update_transport(csum: int, change: int, udp: bool, v4: bool) -> int:
    """`update_sum` of a transport checksum field, with UDP's rules for zero.

    A UDP checksum of 0 is left alone, as Linux's NAT does (`udp_manip_pkt` updates only a
    non-zero one): over IPv4 the datagram was sent without a checksum (RFC 768); over IPv6 the
    datagram is invalid (RFC 8200 §8.1) and stays so. A UDP checksum that comes out as 0 is
    sent as 0xFFFF, over both. TCP and ICMP keep whatever the update gives. `v4` is kept for
    the callers' symmetry with the rules above; both families follow them alike.
    """
    if udp and csum == 0:
        return 0
    value = update_sum(csum, change)
    if udp and value == 0:
        return 0xFFFF
    return value
