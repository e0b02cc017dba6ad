"""The alignchecker: the compiled BPF object's structs against the Python layouts.

The object is built (or taken from the cache) and its BTF read with bpftool; the size and every
member's offset and size of `struct flow_entry`, `struct tcp_dir` and `struct flow_key` must be
those of ENTRY_DTYPE, and the records the control API packs by hand (config, port, hold
record, hold operation) must have the sizes the program was compiled with. The generated
constants header must state every enum member and table of the Python definitions.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess

import numpy as np
import pytest

from flowshift.entry import ENTRY_DTYPE, Status
from flowshift.host import Classifier
from flowshift.live import build, consts, datapath
from flowshift.packet import view
from flowshift.services import conntrack as ct
from flowshift.services import conntrack_tcp as ct_tcp
from flowshift.verdict import PuntReason, Reason, Verdict


@pytest.fixture(scope="module")
def btf() -> dict[int, dict]:
    obj = build.build()
    bpftool = build._tool("bpftool")
    out = subprocess.run([bpftool, "btf", "dump", "file", str(obj), "-j"], check=True,
                         capture_output=True).stdout
    return {t["id"]: t for t in json.loads(out)["types"]}


def _size(types: dict[int, dict], type_id: int) -> int:
    t = types[type_id]
    if t["kind"] in ("TYPEDEF", "CONST", "VOLATILE"):
        return _size(types, t["type_id"])
    if t["kind"] == "ARRAY":
        return t["nr_elems"] * _size(types, t["type_id"])
    return int(t["size"])


def _struct(types: dict[int, dict], name: str) -> dict:
    found = [t for t in types.values() if t["kind"] == "STRUCT" and t.get("name") == name]
    assert len(found) == 1, f"struct {name}: {len(found)} definitions in the object's BTF"
    return found[0]


def _layout(types: dict[int, dict], name: str) -> tuple[int, list[tuple[str, int, int]]]:
    s = _struct(types, name)
    members = []
    for m in s["members"]:
        assert m["bits_offset"] % 8 == 0, f"{name}.{m['name']} is a bit field"
        members.append((m["name"], m["bits_offset"] // 8, _size(types, m["type_id"])))
    return s["size"], members


def _dtype_layout(dt: np.dtype) -> tuple[int, list[tuple[str, int, int]]]:
    assert dt.names is not None and dt.fields is not None
    return dt.itemsize, [(n, dt.fields[n][1], dt.fields[n][0].itemsize) for n in dt.names]


def test_flow_entry_matches_entry_dtype(btf):
    assert _layout(btf, "flow_entry") == _dtype_layout(ENTRY_DTYPE)


def test_tcp_dir_matches_the_entry_window_tracking_record(btf):
    seen = ENTRY_DTYPE.fields["seen0"][0]  # type: ignore[index]
    assert _layout(btf, "tcp_dir") == _dtype_layout(seen)


def test_flow_key_is_the_entry_prefix(btf):
    size, members = _layout(btf, "flow_key")
    _, entry = _dtype_layout(ENTRY_DTYPE)
    assert members == entry[:len(consts.KEY_FIELDS)]
    assert size == datapath.KEY_SIZE == members[-1][1] + members[-1][2]


def test_records_packed_by_the_control_api_fit_the_program(btf):
    classifier = Classifier(())
    config = datapath._config(datapath.Mode.FAST, datapath.Clock.MONO, 1, True, classifier)
    assert _struct(btf, "fs_config")["size"] == len(config)
    assert _struct(btf, "fs_port")["size"] == len(datapath.Port(1).pack())
    assert _struct(btf, "flow_hold")["size"] == len(datapath._hold(datapath.Hold.HELD))
    assert _struct(btf, "hold_op")["size"] == datapath.KEY_SIZE + struct.calcsize("<II")
    _, ranges = _layout(btf, "fs_config")
    assert dict((n, (o, s)) for n, o, s in ranges)["ranges"][1] == 40 * datapath.MAX_RANGES


def _defines() -> dict[str, int]:
    text = consts.render()
    return {m[1]: int(m[2]) for m in re.finditer(r"^#define (\w+) (-?\d+)(?:LL)?$", text, re.M)}


def _array(name: str) -> list[int]:
    m = re.search(rf"{name}\[\d+\] = \{{([^}}]*)\}}", consts.render())
    assert m, name
    return [int(v) for v in m[1].split(",")]


def test_constants_header_states_the_python_definitions():
    d = _defines()
    for prefix, enum in (("VERDICT", Verdict), ("REASON", Reason), ("PUNT", PuntReason),
                         ("STATUS", Status), ("TCP_STATE", ct_tcp.TcpState),
                         ("TCP_ACTION", ct_tcp.TcpAction)):
        for member in enum:
            assert d[f"{prefix}_{member.name}"] == member.value, f"{prefix}_{member.name}"
    for name in dir(ct_tcp):
        if name.startswith("TCP_FLAG_"):
            assert d[name] == getattr(ct_tcp, name)
    for flag in ("FIN", "SYN", "RST", "ACK"):
        assert d[f"TH_{flag}"] == getattr(view, f"TCP_{flag}")
    assert d["TCP_TIMEOUT_RETRANS_NS"] == ct_tcp.TIMEOUT_RETRANS_NS
    assert d["TCP_TIMEOUT_UNACK_NS"] == ct_tcp.TIMEOUT_UNACK_NS
    assert d["UDP_TIMEOUT_REPLIED_NS"] == ct.UDP_TIMEOUT_REPLIED
    assert d["ICMP_TIMEOUT_NS"] == ct.ICMP_TIMEOUT
    assert d["TCP_MAX_RETRANS"] == ct_tcp.NF_CT_TCP_MAX_RETRANS
    n = len(ct_tcp.TcpState)
    for direction in (0, 1):
        row = ct_tcp.TCP_CONNTRACKS[direction][ct_tcp.TCP_ACK_SET]
        assert _array(f"tcp_ack_row{direction}")[:n] == list(row)
    assert _array("tcp_timeouts_ns")[:n] == list(ct_tcp.TCP_TIMEOUTS_NS)
    assert d["FLOW_ENTRY_SIZE"] == ENTRY_DTYPE.itemsize


def test_the_object_is_cached_by_its_inputs(tmp_path):
    first = build.build(tmp_path)
    assert build.build(tmp_path) == first  # unchanged inputs: the cached object
    assert first.parent == tmp_path and first.stat().st_size > 0
