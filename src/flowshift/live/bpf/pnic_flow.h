/* Per-flow work: a port of tiers/_pnic_flow.py (the TCP conntrack update, UDP/ICMP timeouts,
 * counters, the NAT/LB rewrite with RFC 1624 checksum updates), step by step, on a
 * struct flow_entry in the flows map and the frame through bpf_skb_load/store_bytes.
 * Sequence numbers are __u32: the Python's `& M32` is C's unsigned wrap-around.
 */
#pragma once

static __always_inline int before32(__u32 a, __u32 b)
{
	return (__s32)(a - b) < 0;
}

static __always_inline int after32(__u32 a, __u32 b)
{
	return (__s32)(b - a) < 0;
}

static __always_inline __u32 scaled(__u32 win, __u32 scale)
{
	return scale >= 32 ? 0 : (__u32)((__u64)win << scale);
}

static __always_inline int lenient(struct tcp_dir *sender, int action)
{
	if (sender->flags & TCP_FLAG_BE_LIBERAL)
		return TCP_ACTION_ACCEPT;
	return action;
}

static __always_inline __u32 highest_sack(struct pkt *p, __u32 ack)
{
	__u32 sack = ack;
	for (int j = 0; j < 4; j++) {
		if (j >= p->sack_n)
			break;
		__s32 at = p->sack_at + 8 * j + 4;
		if (at < 0 || at > 60)
			break;
		__u32 k = bounded(at);
		if (k > 60)
			break;
		__u32 right = rd32(p->th + k);
		if (after32(right, sack))
			sack = right;
	}
	return sack;
}

static __always_inline __u32 max_ack_window(struct tcp_dir *sender)
{
	__u32 maxwin = sender->maxwin;
	return maxwin > TCP_MAXACKWINCONST ? maxwin : TCP_MAXACKWINCONST;
}

/* conntrack_tcp._in_window for a segment with ACK and without SYN, FIN, RST */
static __always_inline int tcp_in_window(struct flow_entry *e, __u32 d, struct pkt *p)
{
	struct tcp_dir *sender = d ? &e->seen1 : &e->seen0;
	struct tcp_dir *receiver = d ? &e->seen0 : &e->seen1;
	__u32 seq = p->seq, ack = p->ack, win_raw = p->window, win;
	__u32 end = seq + (__u32)p->payload;
	__u32 sack = ack;
	if (receiver->flags & TCP_FLAG_SACK_PERM)
		sack = highest_sack(p, ack);

	if (sender->maxwin == 0) {
		/* first packet seen from this side mid-stream: learn from it */
		sender->end = end;
		__u32 swin = scaled(win_raw, sender->scale);
		__u32 maxwin = swin ? swin : 1;
		sender->maxwin = maxwin;
		sender->maxend = end + maxwin;
		if (receiver->maxwin == 0) {
			receiver->end = sack;
			receiver->maxend = sack;
		} else if (sack == receiver->end + 1) {
			receiver->end = sack;
		}
	}

	__u32 s_end = sender->end, s_maxend = sender->maxend;
	__u32 r_end = receiver->end, r_maxwin = receiver->maxwin;
	if (!before32(seq, s_maxend + 1)) {
		/* I: data starts beyond the receiver's window */
		__u32 overshot = end - s_maxend + 1;
		int ack_ok = after32(sack, r_end - max_ack_window(sender) - 1);
		int in_recv_win = r_maxwin != 0 && after32(end, s_end - r_maxwin - 1);
		if (in_recv_win && ack_ok && overshot <= r_maxwin && before32(sack, r_end + 1)) {
			sender->end = end;
			sender->flags |= TCP_FLAG_DATA_UNACKNOWLEDGED;
			return lenient(sender, TCP_ACTION_IGNORE);
		}
		return lenient(sender, TCP_ACTION_INVALID);
	}
	if (!before32(sack, r_end + 1))
		return lenient(sender, TCP_ACTION_INVALID); /* III: acknowledges data never seen */
	if (r_maxwin != 0 && !after32(end, s_end - r_maxwin - 1))
		return lenient(sender, TCP_ACTION_IGNORE); /* II: retransmission of acked data */
	if (!after32(sack, r_end - max_ack_window(sender) - 1))
		return lenient(sender, TCP_ACTION_IGNORE); /* IV: very old ACK */

	win = scaled(win_raw, sender->scale);
	__u32 swin = win + sack - ack;
	if (sender->maxwin < swin)
		sender->maxwin = swin;
	if (after32(end, s_end)) {
		sender->end = end;
		sender->flags |= TCP_FLAG_DATA_UNACKNOWLEDGED;
	}
	if (!(sender->flags & TCP_FLAG_MAXACK_SET)) {
		sender->maxack = ack;
		sender->flags |= TCP_FLAG_MAXACK_SET;
	} else if (after32(ack, sender->maxack)) {
		sender->maxack = ack;
	}

	s_maxend = sender->maxend;
	r_maxwin = receiver->maxwin;
	if (r_maxwin != 0 && after32(end, s_maxend))
		receiver->maxwin = r_maxwin + end - s_maxend;
	__u32 right_edge = sack + win;
	if (after32(right_edge, receiver->maxend - 1))
		receiver->maxend = win ? right_edge : right_edge + 1;
	if (ack == receiver->end)
		receiver->flags &= ~TCP_FLAG_DATA_UNACKNOWLEDGED;

	/* the segment is ACK_SET: count identical ones in a row (retransmissions) */
	if (e->last_dir == d && e->last_seq == seq && e->last_ack == ack && e->last_end == end &&
	    e->last_win == win_raw) {
		e->retrans = e->retrans + 1;
	} else {
		e->last_dir = d;
		e->last_seq = seq;
		e->last_ack = ack;
		e->last_end = end;
		e->last_win = win_raw;
		e->retrans = 0;
	}
	return TCP_ACTION_ACCEPT;
}

static __always_inline __s64 tcp_timeout(struct flow_entry *e, __u32 new_state)
{
	__s64 state_timeout = tcp_timeouts_ns[new_state & (TCP_TABLE_SIZE - 1)];
	if (e->retrans >= TCP_MAX_RETRANS && state_timeout > TCP_TIMEOUT_RETRANS_NS)
		return TCP_TIMEOUT_RETRANS_NS;
	__u8 flags = e->seen0.flags | e->seen1.flags;
	if ((flags & TCP_FLAG_DATA_UNACKNOWLEDGED) && state_timeout > TCP_TIMEOUT_UNACK_NS)
		return TCP_TIMEOUT_UNACK_NS;
	if (e->last_win == 0 && state_timeout > TCP_TIMEOUT_RETRANS_NS)
		return TCP_TIMEOUT_RETRANS_NS;
	return state_timeout;
}

/* conntrack_tcp._done for IGNORE: a reply packet the tracker passes marks SEEN_REPLY */
static __always_inline int tcp_ignored(struct flow_entry *e, __u32 d)
{
	if (d == 1)
		e->status |= STATUS_SEEN_REPLY;
	return TCP_ACTION_IGNORE;
}

/* conntrack_tcp.tcp_packet for a segment without SYN, FIN, RST: the action; p->timeout set
 * when it is ACCEPT */
static __always_inline int tcp_track(struct flow_entry *e, __u32 d, struct pkt *p)
{
	if (!(p->flags & TH_ACK))
		return TCP_ACTION_INVALID; /* no ACK, no SYN/FIN/RST: not a valid combination */
	__u32 old_state = e->tcp_state & (TCP_TABLE_SIZE - 1); /* < 10: see processable */
	__u32 new_state = d ? tcp_ack_row1[old_state] : tcp_ack_row0[old_state];
	if (new_state == TCP_STATE_IGNORE) {
		/* conntrack_tcp._note_ignored for an ACK_SET packet */
		e->last_index = TCP_ACK_SET;
		e->last_dir = d;
		e->last_seq = p->seq;
		e->last_end = p->seq + (__u32)p->payload;
		e->last_win = p->window;
		if (old_state == TCP_STATE_SYN_SENT && d == 1)
			e->last_ack = p->ack;
		return tcp_ignored(e, d);
	}
	if (new_state == TCP_STATE_INVALID)
		return TCP_ACTION_INVALID;
	if (new_state == TCP_STATE_TIME_WAIT) {
		if (old_state == TCP_STATE_LAST_ACK && e->last_dir != d &&
		    e->last_index == TCP_SYN_SET && (e->last_flags & TCP_FLAG_CHALLENGE_ACK)) {
			e->last_flags &= ~TCP_FLAG_CHALLENGE_ACK;
			return tcp_ignored(e, d);
		}
	} else if (new_state == TCP_STATE_SYN_RECV && d == 1 &&
		   (e->last_flags & TCP_FLAG_SIMULTANEOUS_OPEN)) {
		new_state = TCP_STATE_ESTABLISHED;
	}

	int action = tcp_in_window(e, d, p);
	if (action == TCP_ACTION_IGNORE)
		return tcp_ignored(e, d);
	if (action == TCP_ACTION_INVALID)
		return TCP_ACTION_INVALID;

	e->last_index = TCP_ACK_SET;
	e->last_dir = d;
	e->tcp_state = new_state;
	__s64 t = tcp_timeout(e, new_state);
	if (!(e->status & STATUS_SEEN_REPLY)) {
		if (new_state == TCP_STATE_ESTABLISHED && t > TCP_TIMEOUT_UNACK_NS)
			t = TCP_TIMEOUT_UNACK_NS; /* picked up mid-stream, no answer yet */
	} else if (!(e->status & STATUS_ASSURED) && new_state == TCP_STATE_ESTABLISHED &&
		   (old_state == TCP_STATE_SYN_RECV || old_state == TCP_STATE_ESTABLISHED)) {
		e->status |= STATUS_ASSURED;
	}
	if (d == 1)
		e->status |= STATUS_SEEN_REPLY;
	p->timeout = t;
	return TCP_ACTION_ACCEPT;
}

/* -- rewrite ------------------------------------------------------------------------------ */

/* checksum.ones_sum of n (4 or 16) bytes: 0 only for all zero bytes, else 1..0xFFFF */
static __always_inline __u32 ones_sum(const __u8 *a, int n)
{
	__u64 v = 0;
	for (int k = 0; k < 16; k += 2) {
		if (k >= n)
			break;
		v += rd16(a + k);
	}
	if (v == 0)
		return 0;
	__u32 r = v % 0xFFFF;
	return r ? r : 0xFFFF;
}

static __always_inline void st16(struct __sk_buff *skb, __u32 at, __u32 value, int direct)
{
	__u8 w[2] = {value >> 8, value & 0xFF};
	store_hdr(skb, at, w, 2, direct);
}

/* rewrite._adjust for several fields at once (see docs/pnic-engine.md) */
static __always_inline void adjust(struct __sk_buff *skb, __u32 at, __u64 terms, int udp,
				   int v4, int direct)
{
	__u8 w[2];
	if (LOAD(skb, at, w, 2))
		return;
	__u32 csum = rd16(w);
	if (udp && csum == 0)
		return; /* a UDP checksum of 0 is left alone, as Linux's NAT does (both families) */
	__u64 t = (~csum & 0xFFFF) + terms;
	for (int k = 0; k < 4; k++)
		if (t >> 16)
			t = (t & 0xFFFF) + (t >> 16);
	__u32 value = ~t & 0xFFFF;
	if (value == 0 && udp)
		value = 0xFFFF; /* a computed zero is sent as all ones (RFC 768; RFC 8200 for IPv6) */
	st16(skb, at, value, direct);
}

static __always_inline int same_addr(const __u8 *a, const __u8 *b, int n)
{
	for (int k = 0; k < 16; k++) {
		if (k >= n)
			break;
		if (a[k] != b[k])
			return 0;
	}
	return 1;
}

/* rewrite._set_addr without the checksums: write the address, return its ~old + new */
static __always_inline __u64 set_addr(struct __sk_buff *skb, __u32 at, const __u8 *old,
				      const __u8 *new, int n, int direct)
{
	__u32 old_sum = ones_sum(old, n), new_sum = ones_sum(new, n);
	__u8 buf[16];
	__builtin_memcpy(buf, new, 16);
	if (n == 4)
		store_hdr(skb, at, buf, 4, direct);
	else
		store_hdr(skb, at, buf, 16, direct);
	return (__u64)(~old_sum & 0xFFFF) + new_sum;
}

static __always_inline __u64 set_port(struct __sk_buff *skb, __u32 at, __u32 old, __u32 port,
				      int direct)
{
	st16(skb, at, port, direct);
	return (__u64)(~old & 0xFFFF) + port;
}

/* A CHECKSUM_PARTIAL skb (a local stack's segment over veth): its L4 field holds the folded
 * pseudo-header sum, not complemented, and the device sums the rest. Only the addresses (the
 * pseudo-header) enter it, as Linux's inet_proto_csum_replace4 does for such an skb. */
static __always_inline void adjust_partial(struct __sk_buff *skb, __u32 at, __u64 terms,
					   int direct)
{
	__u8 w[2];
	if (LOAD(skb, at, w, 2))
		return;
	__u64 t = rd16(w) + terms;
	for (int k = 0; k < 4; k++)
		if (t >> 16)
			t = (t & 0xFFFF) + (t >> 16);
	st16(skb, at, t & 0xFFFF, direct);
}

/* xlat.translate: rewrite a packet of the flow in direction d (0 original, 1 reply) */
FS_GLOBAL int fs_translate(struct __sk_buff *skb, struct flow_entry *e, __u32 d, struct pkt *p)
{
	if (!e || !p)
		return 0;
	int n = p->family == 4 ? 4 : 16;
	if (same_addr(e->src, e->xsrc, n) && same_addr(e->dst, e->xdst, n) &&
	    e->sport == e->xsport && e->dport == e->xdport)
		return 0;
	__u8 src[16], dst[16];
	__u32 sport, dport;
	if (d == 0) {
		__builtin_memcpy(src, e->xsrc, 16);
		__builtin_memcpy(dst, e->xdst, 16);
		sport = e->xsport;
		dport = e->xdport;
	} else {
		__builtin_memcpy(src, e->dst, 16);
		__builtin_memcpy(dst, e->src, 16);
		sport = e->dport;
		dport = e->sport;
	}
	__u32 l3 = p->l3, l4 = p->l4;
	int direct = !p->complete;
	__u32 src_at = l3 + (p->family == 4 ? 12 : 8);
	__u32 dst_at = l3 + (p->family == 4 ? 16 : 24);
	__u64 addr_terms = 0;
	if (!same_addr(p->src, src, n))
		addr_terms += set_addr(skb, src_at, p->src, src, n, direct);
	if (!same_addr(p->dst, dst, n))
		addr_terms += set_addr(skb, dst_at, p->dst, dst, n, direct);
	__u64 port_terms = 0;
	__u32 cur_sport = p->sport, cur_dport = p->dport;
	if (cur_sport != sport) {
		port_terms += set_port(skb, p->echo ? l4 + 4 : l4, cur_sport, sport, direct);
		if (p->echo)
			cur_dport = sport; /* the identifier is both ports */
	}
	if (cur_dport != dport)
		port_terms += set_port(skb, p->echo ? l4 + 4 : l4 + 2, cur_dport, dport, direct);
	if (p->family == 4 && addr_terms)
		adjust(skb, l3 + 10, addr_terms, 0, 1, direct);
	if (p->partial) {
		if (addr_terms)
			adjust_partial(skb, p->proto == 6 ? l4 + 16 : l4 + 6, addr_terms, direct);
		return 0;
	}
	if (p->proto == 6 || p->proto == 17 || p->proto == 58)
		port_terms += addr_terms;
	if (port_terms) {
		__u32 at = p->proto == 6 ? l4 + 16 : p->proto == 17 ? l4 + 6 : l4 + 2;
		adjust(skb, at, port_terms, p->proto == 17, p->family == 4, direct);
	}
	return 0;
}

/* chain.process_flow's state update for a packet the datapath processes: the Verdict, *reason
 * and *translate (rewrite the packet after). It runs under the flow's lock, so it touches only
 * the entry, never the packet (no helper calls under a bpf_spin_lock). */
static __always_inline int track_flow(struct flow_entry *e, __u32 d, struct pkt *p, __s64 now,
				      __u32 *reason)
{
	*reason = REASON_ESTABLISHED;
	if (e->proto == 6) {
		int action = tcp_track(e, d, p);
		if (action == TCP_ACTION_INVALID) {
			*reason = REASON_INVALID;
			return VERDICT_DROP;
		}
		if (action == TCP_ACTION_IGNORE)
			return VERDICT_FORWARD; /* passed, but neither counted nor timed */
		e->expires = now + p->timeout;
	} else if (e->proto == 17) {
		if (e->status & STATUS_SEEN_REPLY) {
			__s64 timeout = UDP_TIMEOUT_UNREPLIED_NS;
			if (now > e->stream_ts) {
				timeout = UDP_TIMEOUT_REPLIED_NS;
				e->status |= STATUS_ASSURED;
			}
			e->expires = now + timeout;
		} else {
			e->expires = now + UDP_TIMEOUT_UNREPLIED_NS;
		}
		if (d)
			e->status |= STATUS_SEEN_REPLY;
	} else {
		e->expires = now + ICMP_TIMEOUT_NS;
		if (d)
			e->status |= STATUS_SEEN_REPLY;
	}
	if (d) {
		e->packets[1] += 1;
		e->bytes[1] += p->total;
	} else {
		e->packets[0] += 1;
		e->bytes[0] += p->total;
	}
	e->last_seen = now;
	return VERDICT_FORWARD;
}
