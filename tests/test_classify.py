"""The compiled classifier (the PNIC's and the fast path's, _pnic_batch.classify over
classifier_tables) against the Python one (tiers/classify.py), on hosts of many machines
whose networks nest, touch and leave gaps, and on addresses in, at the edges of and between
them."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from flowshift.config import parse_config
from flowshift.services.rules import EGRESS
from flowshift.tiers._pnic_batch import classify
from flowshift.tiers._pnic_index import address_words
from flowshift.tiers._pnic_parse import F_DST_HI, F_DST_LO, F_FAMILY, F_SRC_HI, F_SRC_LO, N_FIELDS
from flowshift.tiers.classify import Classifier
from flowshift.tiers.pnic_engine import classifier_tables

V4 = ipaddress.ip_network("10.0.0.0/16")
V6 = ipaddress.ip_network("fd00::/48")


def _v4(a: int, prefix: int, at: int) -> str:
    """A network of prefix length >= 24 in slot `a` (10.0.a.0/24), around its address `at`."""
    return str(ipaddress.ip_network((int(V4.network_address) + (a << 8) + at, prefix),
                                    strict=False))


def _v6(a: int, prefix: int, at: int) -> str:
    """A network of prefix length >= 64 in slot `a` (a /64 of fd00::/48), around `at` << 56."""
    return str(ipaddress.ip_network((int(V6.network_address) + (a << 64) + (at << 56), prefix),
                                    strict=False))


@st.composite
def hosts(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Machines that share no address (each its own /24 and /64 slots, in which its networks
    nest and overlap), touching each other in the slot order and leaving gaps between."""
    n = draw(st.integers(1, 16))
    slots = draw(st.permutations(range(64)))
    publics = draw(st.permutations(range(16)))
    machines = []
    for j in range(n):
        mine = slots[4 * j:4 * j + 2]  # two slots: its networks nest and overlap in them
        nets = draw(st.lists(st.one_of(
            st.builds(_v4, st.sampled_from(mine), st.integers(24, 28), st.integers(0, 255)),
            st.builds(_v6, st.sampled_from(mine), st.integers(64, 68), st.integers(0, 255))),
            min_size=1, max_size=4, unique=True))
        public = [f"192.0.2.{publics[j]}"] if j < 16 and draw(st.integers(0, 4)) else []
        machines.append({"name": f"m{j}", "addresses": nets, "public": public, "services": []})
    return machines


def _address(draw: st.DrawFn, machines: list[dict[str, Any]]) -> bytes:
    """An address in, at an edge of, or near one of the machines' networks, or a public one."""
    nets = [ipaddress.ip_network(n) for m in machines for n in m["addresses"]]
    kind = draw(st.sampled_from(("first", "last", "inside", "below", "above", "public",
                                 "v4", "v6")))
    if kind in ("first", "last", "inside", "below", "above"):
        net = draw(st.sampled_from(nets))
        first, last = int(net.network_address), int(net.broadcast_address)
        value = {"first": first, "last": last, "below": first - 1, "above": last + 1,
                 "inside": draw(st.integers(first, last))}[kind]
        size = 4 if net.version == 4 else 16
        return (value % (1 << (8 * size))).to_bytes(size, "big")
    if kind == "public":
        return bytes((192, 0, 2, draw(st.integers(0, 20))))
    if kind == "v4":
        return (int(V4.network_address) + draw(st.integers(0, 1 << 16))).to_bytes(4, "big")
    return (int(V6.network_address) + draw(st.integers(0, 1 << 72))).to_bytes(16, "big")


@settings(max_examples=400, deadline=None)
@given(hosts(), st.data())
def test_the_compiled_classifier_is_the_python_one(machines: list[dict[str, Any]],
                                                   data: st.DataObject) -> None:
    cfg = parse_config({"machine": machines}, "host")
    classifier = Classifier(cfg.machines)
    inside, public = classifier_tables(classifier)
    f = np.zeros(N_FIELDS, np.int64)
    for _ in range(20):
        src = _address(data.draw, machines)
        dst = _address(data.draw, machines)
        if len(src) != len(dst):
            continue
        family = 4 if len(src) == 4 else 6
        f[F_FAMILY] = family
        f[F_SRC_HI], f[F_SRC_LO] = np.array(address_words(src), np.uint64).view(np.int64)
        f[F_DST_HI], f[F_DST_LO] = np.array(address_words(dst), np.uint64).view(np.int64)
        # what Classifier.classify reads of a packet
        pkt: Any = SimpleNamespace(family=family, src=src, dst=dst)
        m, direction = classifier.classify(pkt)
        got = classify(f, inside, public)
        want = (m, 0 if direction == EGRESS else 1) if m >= 0 else (-1, 1)
        assert (int(got[0]), int(got[1]) if got[0] >= 0 else 1) == want, (src, dst)


def test_many_public_addresses_are_bisected() -> None:
    """Past SCAN_MAX rows the kernel bisects: every machine's public address, and the
    addresses between and around them, as the Python classifier says."""
    machines = [{"name": f"m{j}", "addresses": [f"10.{j}.0.0/24"], "public": [f"192.0.2.{2 * j}"],
                 "services": []} for j in range(40)]
    classifier = Classifier(parse_config({"machine": machines}, "host").machines)
    inside, public = classifier_tables(classifier)
    f = np.zeros(N_FIELDS, np.int64)
    f[F_FAMILY] = 4
    f[F_SRC_HI], f[F_SRC_LO] = np.array(address_words(bytes((198, 51, 100, 1))),
                                        np.uint64).view(np.int64)
    for last in range(0, 90):
        f[F_DST_HI], f[F_DST_LO] = np.array(address_words(bytes((192, 0, 2, last))),
                                            np.uint64).view(np.int64)
        want = last // 2 if last % 2 == 0 and last < 80 else -1
        assert int(classify(f, inside, public)[0]) == want, last
