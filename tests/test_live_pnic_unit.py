"""The live PNIC's pure parts: the FLOW argument of `live offload` / `live return`."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowshift.flow import FlowKey
from flowshift.live.pnic import flow_text, parse_flow_text

v4 = st.ip_addresses(v=4).map(lambda a: a.packed)
v6 = st.ip_addresses(v=6).map(lambda a: a.packed)
port = st.integers(0, 65535)


@given(st.sampled_from([6, 17, 1, 58]), st.one_of(st.tuples(v4, v4), st.tuples(v6, v6)),
       port, port)
def test_flow_text_parses_back_to_the_original_tuple(proto, addrs, sport, dport):
    src, dst = addrs
    key = FlowKey(4 if len(src) == 4 else 6, proto, 0, src, dst, sport, dport)
    assert parse_flow_text(flow_text(key)) == (proto, src, sport, dst, dport)


def test_the_documented_forms():
    assert parse_flow_text("tcp 10.0.0.1:40000 > 198.51.100.2:5001") == (
        6, bytes([10, 0, 0, 1]), 40000, bytes([198, 51, 100, 2]), 5001)
    assert parse_flow_text("UDP [fd00::1]:5353 > [2001:db8::2]:53")[1] == \
        ipaddress.ip_address("fd00::1").packed


@pytest.mark.parametrize("text, message", [
    ("tcp 10.0.0.1:1 198.51.100.2:2", "expected 'PROTO SRC:PORT > DST:PORT'"),
    ("sctp 10.0.0.1:1 > 198.51.100.2:2", "protocol 'sctp'"),
    ("tcp 10.0.0.1:x > 198.51.100.2:2", "'10.0.0.1:x' is not ADDRESS:PORT"),
    ("tcp 10.0.0.300:1 > 198.51.100.2:2", "is not ADDRESS:PORT"),
    ("tcp 10.0.0.1:65536 > 198.51.100.2:2", "is not ADDRESS:PORT"),
])
def test_bad_flows_are_refused_with_one_line(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as err:
        parse_flow_text(text)
    assert "\n" not in str(err.value)
