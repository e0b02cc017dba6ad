"""IP reassembly in the replay (host.py): held fragments get their datagram's verdict at their
own rows, in input order, packet by packet and in batches alike."""

from __future__ import annotations

from flowshift.config import parse_config
from flowshift.packet.build import udp_frame
from flowshift.packet.defrag import refragment
from flowshift.verdict import Verdict
from hosttools import FIREWALL_HOST, run
from tracetools import CLIENT, SERVER, S, write_pcap


def _fragments(ident: int, size: int = 3000) -> list[bytes]:
    dgram = udp_frame(src=CLIENT, dst=SERVER, sport=4321, dport=53, payload=b"x" * size,
                      ip_id=ident, df=False)
    return [dgram[:14] + f for f in refragment(dgram[14:], 1500)]


def test_reversed_datagram_forwarded_whole_and_incomplete_one_expires(tmp_path) -> None:
    done = _fragments(7)[::-1]  # last fragment first: nothing leaves until the first comes
    cut = _fragments(8)[:-1]  # never completes
    frames = [*done, *cut]
    path = write_pcap(tmp_path / "t.pcap", [(S + i, f) for i, f in enumerate(frames)])
    cfg = parse_config(FIREWALL_HOST, "test")
    runs = [run(path, cfg, policy="never", rows=rows) for rows in (None, 1, 2, 64)]
    for r in runs:
        assert [x.index for x in r.results] == list(range(len(frames)))
        assert [x.verdict for x in r.results[:len(done)]] == [Verdict.FORWARD] * len(done)
        assert {x.reason for x in r.results[len(done):]} == {"frag-expired"}
        assert [x.data for x in r.results] == [x.data for x in runs[0].results]
    # every fragment leaves as it came: same boundaries, same IPv4 id (no NAT here)
    assert [x.data for x in runs[0].results[:len(done)]] == done


def test_a_datagram_that_does_not_parse_once_whole_is_unparsed_at_every_fragment(
        tmp_path) -> None:
    """Fragments of a UDP datagram whose UDP length disagrees with the datagram: once whole it
    does not parse (bad UDP length), and each fragment is unparsed with that reason, as the
    datagram unfragmented would be, never handed to a chain that would rewrite it (through a
    NAT, that was a crash)."""
    dgram = bytearray(udp_frame(src=CLIENT, dst=SERVER, sport=4321, dport=53,
                                payload=b"x" * 3000, ip_id=9, df=False))
    dgram[14 + 20 + 4:14 + 20 + 6] = (4000).to_bytes(2, "big")  # UDP length: past the end
    frames = [bytes(dgram[:14]) + f for f in refragment(bytes(dgram[14:]), 1500)]
    path = write_pcap(tmp_path / "t.pcap", [(S + i, f) for i, f in enumerate(frames)])
    machine = {**FIREWALL_HOST["machine"][0], "public": ["192.0.2.1"],
               "services": ["firewall", "nat", "count"],
               "nat": {"snat": [{"source": "10.0.0.0/24", "to": "192.0.2.1"}]}}
    cfg = parse_config({**FIREWALL_HOST, "machine": [machine]}, "test")
    for engine in ("reference", "compiled"):
        for rows in (None, 1, 64):
            r = run(path, cfg, policy="never", rows=rows, engine=engine)
            assert [(x.verdict, x.reason, x.tier) for x in r.results] == [
                (Verdict.UNPARSED, "bad-udp-length", "")] * len(frames)
