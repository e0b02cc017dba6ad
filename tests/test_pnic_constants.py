"""The compiled kernels hold no fact of their own: every constant equals its source.

numba reads a kernel module's globals as compile-time constants, so each is checked against
the module the reference takes it from (ENTRY_DTYPE, the conntrack types, the verdict enums,
the parser's tables). A constant written by hand that drifts fails here. Also: the entry layout
does not depend on the services, and the kernels' compile cache is keyed by every source they
are compiled from.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import types
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from flowshift import conntrack_types as ct
from flowshift.entry import ENTRY_DTYPE, ENTRY_SIZE, Status
from flowshift.flow import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP
from flowshift.packet import parse, rewrite, route, view
from flowshift.services import conntrack_tcp as ct_tcp
from flowshift.tiers import _pnic_batch as kb
from flowshift.tiers import _pnic_cache as kc
from flowshift.tiers import _pnic_flow as kf
from flowshift.tiers import _pnic_index as ki
from flowshift.tiers import _pnic_parse as kp
from flowshift.verdict import PuntReason, Reason, Verdict

_FIELDS: Mapping[str, Any] = ENTRY_DTYPE.fields or {}
_SEEN = _FIELDS["seen0"][0]
_SEEN_FIELDS: Mapping[str, Any] = _SEEN.fields or {}


def _offset(name: str) -> int:
    return int(_FIELDS[name][1])


# kernel module -> {global name: entry field}
ENTRY_OFFSETS = {
    ki: {"E_FAMILY": "family", "E_PROTO": "proto", "E_ZONE": "zone", "E_SPORT": "sport",
         "E_DPORT": "dport", "E_SRC": "src", "E_DST": "dst", "E_XSRC": "xsrc", "E_XDST": "xdst",
         "E_XSPORT": "xsport", "E_XDPORT": "xdport"},
    kf: {"E_STATUS": "status", "E_TCP_STATE": "tcp_state", "E_LAST_DIR": "last_dir",
         "E_RETRANS": "retrans", "E_LAST_INDEX": "last_index", "E_LAST_FLAGS": "last_flags",
         "E_LAST_SEQ": "last_seq", "E_LAST_ACK": "last_ack", "E_LAST_END": "last_end",
         "E_LAST_WIN": "last_win", "E_SEEN": "seen0", "E_LAST_SEEN": "last_seen",
         "E_EXPIRES": "expires", "E_STREAM_TS": "stream_ts", "E_PACKETS": "packets",
         "E_BYTES": "bytes"},
}

# kernel global -> its source value
FACTS = {
    (ki, "E_SIZE"): ENTRY_SIZE,
    (kf, "SEEN_SIZE"): _SEEN.itemsize,
    (kf, "D_END"): _SEEN_FIELDS["end"][1], (kf, "D_MAXEND"): _SEEN_FIELDS["maxend"][1],
    (kf, "D_MAXWIN"): _SEEN_FIELDS["maxwin"][1], (kf, "D_MAXACK"): _SEEN_FIELDS["maxack"][1],
    (kf, "D_SCALE"): _SEEN_FIELDS["scale"][1], (kf, "D_FLAGS"): _SEEN_FIELDS["flags"][1],
    (kf, "FORWARD"): Verdict.FORWARD, (kf, "DROP"): Verdict.DROP,
    (kf, "ESTABLISHED"): Reason.ESTABLISHED, (kf, "INVALID"): Reason.INVALID,
    (kf, "SEEN_REPLY"): Status.SEEN_REPLY, (kf, "ASSURED"): Status.ASSURED,
    (kf, "TCP_ACK"): view.TCP_ACK,
    (kf, "TCP_LIFE"): view.TCP_SYN | view.TCP_FIN | view.TCP_RST,
    (kf, "PROTO_TCP"): PROTO_TCP, (kf, "PROTO_UDP"): PROTO_UDP,
    (kf, "PROTO_ICMPV6"): PROTO_ICMPV6,
    (kf, "ACCEPT"): ct.TcpAction.ACCEPT, (kf, "A_INVALID"): ct.TcpAction.INVALID,
    (kf, "IGNORE"): ct.TcpAction.IGNORE,
    (kf, "S_SYN_SENT"): ct.TcpState.SYN_SENT, (kf, "S_SYN_RECV"): ct.TcpState.SYN_RECV,
    (kf, "S_ESTABLISHED"): ct.TcpState.ESTABLISHED,
    (kf, "S_LAST_ACK"): ct.TcpState.LAST_ACK, (kf, "S_CLOSE_WAIT"): ct.TcpState.CLOSE_WAIT,
    (kf, "S_CLOSE"): ct.TcpState.CLOSE,
    (kf, "S_TIME_WAIT"): ct.TcpState.TIME_WAIT,
    (kf, "S_INVALID"): ct.STATE_INVALID, (kf, "S_IGNORE"): ct.STATE_IGNORE,
    (kf, "ACK_SET"): ct.TCP_ACK_SET, (kf, "SYN_SET"): ct.TCP_SYN_SET,
    (kf, "SYNACK_SET"): ct.TCP_SYNACK_SET, (kf, "FIN_SET"): ct.TCP_FIN_SET,
    (kf, "RST_SET"): ct.TCP_RST_SET, (kf, "S_FIN_WAIT"): ct.TcpState.FIN_WAIT,
    (kf, "TCP_FIN"): view.TCP_FIN, (kf, "TCP_SYN"): view.TCP_SYN, (kf, "TCP_RST"): view.TCP_RST,
    (kf, "TCP_LIFE_SOFTWARE"): view.TCP_SYN,
    (kf, "TCP_CHECKED"): view.TCP_FIN | view.TCP_SYN | view.TCP_RST | view.TCP_ACK | view.TCP_URG,
    (kf, "FLAG_CLOSE_INIT"): ct.TCP_FLAG_CLOSE_INIT,
    (kf, "FLAG_WINDOW_SCALE"): ct.TCP_FLAG_WINDOW_SCALE, (kf, "MAX_WSCALE"): ct.TCP_MAX_WSCALE,
    (kf, "N_STATES"): len(ct.TcpState),
    (kf, "FLAG_SACK_PERM"): ct.TCP_FLAG_SACK_PERM,
    (kf, "FLAG_BE_LIBERAL"): ct.TCP_FLAG_BE_LIBERAL,
    (kf, "FLAG_DATA_UNACKNOWLEDGED"): ct.TCP_FLAG_DATA_UNACKNOWLEDGED,
    (kf, "FLAG_MAXACK_SET"): ct.TCP_FLAG_MAXACK_SET,
    (kf, "FLAG_CHALLENGE_ACK"): ct.TCP_FLAG_CHALLENGE_ACK,
    (kf, "FLAG_SIMULTANEOUS_OPEN"): ct.TCP_FLAG_SIMULTANEOUS_OPEN,
    (kf, "MAXACKWINCONST"): ct.MAXACKWINCONST,
    (kf, "TTL_EXCEEDED"): Reason.TTL_EXCEEDED, (kf, "TTL_AT_IPV4"): route.TTL_AT_IPV4,
    (kf, "HOP_LIMIT_AT_IPV6"): route.HOP_LIMIT_AT_IPV6,
    **{(kf, name): getattr(ct, name) for name in (
        "K_TCP", "K_RETRANS", "K_UNACK", "K_UDP", "K_UDP_STREAM", "K_ICMP", "K_ICMPV6",
        "K_MAX_RETRANS", "K_BE_LIBERAL", "K_IGNORE_INVALID_RST")},
    (kf, "CSUM_AT_TCP"): rewrite.L4_CHECKSUM_AT[PROTO_TCP],
    (kf, "CSUM_AT_UDP"): rewrite.L4_CHECKSUM_AT[PROTO_UDP],
    (kf, "CSUM_AT_ICMP"): rewrite.L4_CHECKSUM_AT[PROTO_ICMP],
    (kf, "CSUM_AT_IPV4"): rewrite.IPV4_CHECKSUM_AT,
    (kb, "PUNT_MISS"): PuntReason.MISS, (kb, "PUNT_LIFE"): PuntReason.LIFE,
    (kb, "PUNT_EXPIRED"): PuntReason.EXPIRED, (kb, "PUNT_UNSUPPORTED"): PuntReason.UNSUPPORTED,
    (kp, "_ETH_P_IPV4"): parse.ETH_P_IPV4, (kp, "_ETH_P_IPV6"): parse.ETH_P_IPV6,
    (kp, "_VLAN_TPIDS"): tuple(sorted(parse.VLAN_TPIDS)),
    (kp, "_ARPHRD_NETLINK"): parse.ARPHRD_NETLINK, (kp, "_TS_ONLY_MARKER"): parse.TS_ONLY_MARKER,
    (kp, "_AF_INET"): parse.AF_INET, (kp, "_AF_INET6"): tuple(sorted(parse.AF_INET6)),
    (kp, "_LT_ETHERNET"): view.LINKTYPE_ETHERNET,
    (kp, "_LT_RAW"): (view.LINKTYPE_RAW, *view.DLT_RAW_ALIASES),
    (kp, "_LT_IPV4"): view.LINKTYPE_IPV4, (kp, "_LT_IPV6"): view.LINKTYPE_IPV6,
    (kp, "_LT_SLL"): view.LINKTYPE_LINUX_SLL, (kp, "_LT_SLL2"): view.LINKTYPE_LINUX_SLL2,
    (kp, "_LT_NULL"): view.LINKTYPE_NULL, (kp, "_LT_LOOP"): view.LINKTYPE_LOOP,
    (kp, "_IP_MF"): parse.IP_MF, (kp, "_IP_OFFSET"): parse.IP_OFFSET,
    (kp, "_IPV6_EXT"): tuple(sorted(parse.IPV6_EXT_HEADERS)),
    (kp, "_HOPOPTS"): parse.IPPROTO_HOPOPTS, (kp, "_FRAGMENT"): parse.IPPROTO_FRAGMENT,
    (kp, "_AH"): parse.IPPROTO_AH, (kp, "_JUMBO"): parse.IPV6_OPT_JUMBO,
    (kp, "_ICMP_ECHO"): tuple(sorted(parse.ICMP_ECHO_TYPES)),
    (kp, "_ICMP_ERROR"): tuple(sorted(parse.ICMP_ERROR_TYPES)),
    (kp, "_ICMPV6_ECHO"): tuple(sorted(parse.ICMPV6_ECHO_TYPES)),
    (kp, "_ICMPV6_ERROR"): tuple(sorted(parse.ICMPV6_ERROR_TYPES)),
}

# constants that are the kernels' own (layouts of their own arrays, not facts of the reference)
OWN = {
    kb: {"PUNT", "FREE", "LIVE", "RETURNED", "AHEAD", "OUTSIDE", "SCAN_MAX"},
    kf: {"M32", "RST_INVALID", "RST_CHECK", "RST_KEEP_STATE", "RST_TRUSTED"},
    ki: {"EMPTY", "_GOLDEN"},
    kp: {"FAIL", "KEY_ONLY", "FULL", "N_FIELDS"},
}


@pytest.mark.parametrize("module", list(ENTRY_OFFSETS), ids=lambda m: m.__name__)
def test_entry_offsets_are_the_entry_layout(module: types.ModuleType) -> None:
    for name, field in ENTRY_OFFSETS[module].items():
        assert getattr(module, name) == _offset(field), f"{module.__name__}.{name} drifted"
    assert _offset("seen1") == kf.E_SEEN + kf.SEEN_SIZE


def test_every_fact_equals_its_source() -> None:
    drifted = [f"{m.__name__}.{name}: {getattr(m, name)!r} != {value!r}"
               for (m, name), value in FACTS.items() if getattr(m, name) != value]
    assert not drifted


def test_tables_equal_the_state_table_and_the_knob_rows() -> None:
    for d in (ct.ORIGINAL, ct.REPLY):
        for index, row in enumerate(ct_tcp.TCP_CONNTRACKS[d]):
            assert tuple(kf.ROWS[d, index]) == row
    assert kf.ROWS.dtype == np.int64
    row = ct.DEFAULT_KNOBS.row()  # the timeouts the kernels read come from Knobs.row()
    assert row[ct.K_TCP:ct.K_TCP + ct.N_TCP_STATES] == ct.TCP_TIMEOUTS_NS
    assert (row[ct.K_RETRANS], row[ct.K_UNACK]) == (ct.TIMEOUT_RETRANS_NS, ct.TIMEOUT_UNACK_NS)
    assert row[ct.K_UDP] == ct.UDP_TIMEOUT_UNREPLIED
    assert row[ct.K_UDP_STREAM] == ct.UDP_TIMEOUT_REPLIED
    assert (row[ct.K_ICMP], row[ct.K_ICMPV6]) == (ct.ICMP_TIMEOUT, ct.ICMPV6_TIMEOUT)
    assert row[ct.K_MAX_RETRANS] == ct.NF_CT_TCP_MAX_RETRANS
    assert row[ct.K_BE_LIBERAL] == int(ct.NF_CT_TCP_BE_LIBERAL)
    assert row[ct.K_IGNORE_INVALID_RST] == int(ct.NF_CT_TCP_IGNORE_INVALID_RST)


@pytest.mark.parametrize("module", [kb, kf, ki, kp], ids=lambda m: m.__name__)
def test_every_kernel_constant_is_checked(module: types.ModuleType) -> None:
    """A new constant in a kernel module must be added to the checks above (or to OWN)."""
    checked = set(ENTRY_OFFSETS.get(module, {})) | {n for m, n in FACTS if m is module}
    checked |= OWN.get(module, set()) | ({"ROWS"} if module is kf else set())
    tree = ast.parse(inspect.getsource(module))
    assigned = {t.id for node in tree.body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    constants = {name for name in assigned
                 if name.lstrip("_").isupper()
                 and isinstance(getattr(module, name), int | tuple | np.ndarray)
                 and not name.startswith("F_")}  # F_*: the parser's own field vector
    assert constants <= checked, f"unchecked: {sorted(constants - checked)}"


def _flowshift_modules_after(statement: str) -> set[str]:
    code = (f"import sys; {statement}; "
            "print(' '.join(m for m in sys.modules if m.startswith('flowshift')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    return set(out.stdout.split())


def test_the_entry_does_not_import_the_services() -> None:
    loaded = _flowshift_modules_after("import flowshift.entry")
    assert not {m for m in loaded if m.startswith("flowshift.services")}


@pytest.mark.parametrize("kernels", ["tiers._pnic_batch", "tiers._fastpath_batch",
                                     "packet.batch", "packet.fragrows", "_verdict_rows",
                                     "services.maglev"])
def test_compile_cache_is_keyed_by_every_kernel_source(kernels: str) -> None:
    """Changing any module the kernels read invalidates the cache (numba alone would only see
    the kernel's own file)."""
    loaded = _flowshift_modules_after(f"import flowshift.{kernels}")
    files = {m.removeprefix("flowshift.").replace(".", "/") for m in loaded}
    files = {f"{f}/__init__.py" if f in ("flowshift", "packet", "services", "tiers") else
             f"{f}.py" for f in files}
    files = {f.replace("flowshift/__init__.py", "__init__.py") for f in files}
    assert files <= set(kc.SOURCES), sorted(files - set(kc.SOURCES))
