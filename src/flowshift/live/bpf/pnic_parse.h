/* Header parsing for the datapath: a port of tiers/_pnic_parse.py (itself packet/parse.py).
 *
 * The same checks in the same order, so the program reaches the engine's decision for every
 * frame: P_FAIL (no lookup), P_KEY_ONLY (the key, but a hit goes back to software),
 * P_FULL (every field the chain reads). P_NOT_PORTED: a shape the engine parses but this
 * port does not (more than MAX_VLAN tags, more than MAX_EXT IPv6 extension headers, an IPv6
 * jumbogram): punted as PUNT_UNSUPPORTED without a lookup.
 *
 * Headers are copied to the stack: straight from the linear data when they lie in it, else
 * with bpf_skb_load_bytes (a non-linear skb needs no pull);
 * `limit` is skb->len, the frame's whole length (a kernel frame is never cut by a snaplen).
 */
#pragma once

#define P_FAIL 0
#define P_KEY_ONLY 1
#define P_FULL 2
#define P_NOT_PORTED 3

#define MAX_VLAN 4
#define MAX_EXT 8
#define TS_ONLY_MARKER 0x0101080A

/* A global function: the verifier checks it once, on its own, instead of at every path that
 * reaches it (the option walks inlined everywhere overflow its budget). Its pointer arguments
 * are memory of their struct's size, which may be NULL. */
#define FS_GLOBAL __attribute__((noinline))

/* An index the verifier can bound: the mask stays in the code (clang would drop it where it
 * proves it redundant, and the verifier, tracking another register, could not follow). */
static __always_inline __u32 bounded(__u32 i)
{
	asm volatile("" : "+r"(i));
	return i & 63;
}

/* Copy len (a constant at every call site) bytes at off to the stack; 0 or a negative errno */
#define LOAD(skb, off, to, len) load_hdr(skb, off, to, len)
static __always_inline int load_hdr(struct __sk_buff *skb, __u32 off, void *to, const __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	if (off < 2048) {
		__u32 o = off;
		asm volatile("" : "+r"(o)); /* the verifier must see the mask on this register */
		o &= 2047;
		if (data + o + len <= end) {
			__builtin_memcpy(to, data + o, len);
			return 0;
		}
	}
	return bpf_skb_load_bytes(skb, off, to, len);
}

/* Write len (a constant) bytes at off: straight into the linear data when it holds them and
 * direct is set, else with bpf_skb_store_bytes, which also keeps a CHECKSUM_COMPLETE skb's
 * csum right (so direct is clear for such an skb). */
static __always_inline void store_hdr(struct __sk_buff *skb, __u32 off, const void *from,
				      const __u32 len, int direct)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	if (direct && off < 2048) {
		__u32 o = off;
		asm volatile("" : "+r"(o));
		o &= 2047;
		if (data + o + len <= end) {
			__builtin_memcpy(data + o, from, len);
			return;
		}
	}
	bpf_skb_store_bytes(skb, off, from, len, BPF_F_RECOMPUTE_CSUM);
}

#define ETH_P_IPV4 0x0800
#define ETH_P_IPV6 0x86DD

struct pkt {
	__s32 l3, l4, total, l4len, payload;
	__u32 seq, ack;
	__u32 sport, dport, window;
	__u32 family, proto, flags, echo;
	__s32 sack_at; /* index in th[] of the first block of the last SACK option, -1 none */
	__u32 sack_n;
	__u64 src_hi, src_lo, dst_hi, dst_lo; /* addresses as big-endian words */
	__u8 src[16], dst[16];
	__u8 th[64]; /* the TCP header with its options */
	__u8 ip[64]; /* the IP header (IPv4 with its options) */
	__s64 timeout; /* tcp_track's result */
	__u32 partial; /* skb is CHECKSUM_PARTIAL: the L4 field holds the pseudo-header sum */
	__u32 complete; /* skb is CHECKSUM_COMPLETE: stores must keep skb->csum right */
};

static __always_inline __u32 rd16(const __u8 *p)
{
	return ((__u32)p[0] << 8) | p[1];
}

static __always_inline __u32 rd32(const __u8 *p)
{
	return ((__u32)p[0] << 24) | ((__u32)p[1] << 16) | ((__u32)p[2] << 8) | p[3];
}

static __always_inline __u64 rd64(const __u8 *p)
{
	return ((__u64)rd32(p) << 32) | rd32(p + 4);
}

static __always_inline int is_vlan(__u32 et)
{
	return et == 0x8100 || et == 0x88A8 || et == 0x9100 || et == 0x9200;
}

#define OPT_END -1 /* the walk is over: the options are valid */
#define OPT_BAD -2 /* malformed options */

/* One IPv4 option at i (0: the first after the 20-byte header) of end bytes: the next
 * option's index, OPT_END or OPT_BAD. One global step per option keeps the verifier's work
 * linear in the options' length. */
FS_GLOBAL int fs_ipv4_option(struct pkt *p, __s32 i, __s32 end)
{
	if (!p || i < 0 || i >= 40)
		return OPT_END;
	__u8 kind = p->ip[bounded(20 + i)];
	if (kind == 0)
		return OPT_END;
	if (kind == 1)
		return i + 1;
	if (i + 1 >= end)
		return OPT_BAD;
	__s32 size = p->ip[bounded(21 + i)];
	if (size < 2 || i + size > end)
		return OPT_BAD;
	return i + size;
}

/* One TCP option at i (an index in th[], from 20) of a header of end bytes, as
 * parse._tcp_options checks it; notes where the last SACK option's blocks are. */
FS_GLOBAL int fs_tcp_option(struct pkt *p, __s32 i, __s32 end)
{
	if (!p || i < 20 || i >= 60)
		return OPT_END;
	__u8 kind = p->th[bounded(i)];
	if (kind == 0)
		return OPT_END;
	if (kind == 1)
		return i + 1;
	if (i + 1 >= end)
		return OPT_BAD;
	__s32 size = p->th[bounded(i + 1)];
	if (size < 2 || i + size > end)
		return OPT_BAD;
	if (kind == 2) {
		if (size != 4)
			return OPT_BAD;
	} else if (kind == 3) {
		if (size != 3)
			return OPT_BAD;
	} else if (kind == 4) {
		if (size != 2)
			return OPT_BAD;
	} else if (kind == 5) {
		if (size < 10 || ((size - 2) & 7))
			return OPT_BAD;
		p->sack_at = i + 2;
		p->sack_n = (size - 2) >> 3;
	} else if (kind == 8 && size != 10) {
		return OPT_BAD;
	}
	return i + size;
}

/* The options of an IPv4 (tcp 0: in ip[] from 20, i from 0) or a TCP header (tcp 1: in th[],
 * i from 20) up to end, one global step per option; 1 when they are valid. `tcp` is a
 * constant at each call site, so each inlined copy keeps one of the two steps. */
static __always_inline int options_ok(struct pkt *p, __s32 i, __s32 end, const int tcp)
{
	for (int k = 0; k < 40; k++) {
		if (i >= end)
			return 1;
		i = tcp ? fs_tcp_option(p, i, end) : fs_ipv4_option(p, i, end);
		if (i == OPT_END)
			return 1;
		if (i == OPT_BAD)
			return 0;
	}
	return 1;
}

static __always_inline int parse_tcp(struct __sk_buff *skb, struct pkt *p, __s32 off, __s32 limit)
{
	__s32 seglen = p->l4len;
	if (seglen < 20 || limit - off < 20)
		return P_FAIL;
	if (LOAD(skb, off, p->th, 20))
		return P_FAIL;
	__s32 hlen = (p->th[12] >> 4) << 2;
	if (hlen < 20 || hlen > seglen)
		return P_FAIL;
	p->l4 = off;
	p->sport = rd16(p->th);
	p->dport = rd16(p->th + 2);
	p->seq = rd32(p->th + 4);
	p->ack = rd32(p->th + 8);
	p->flags = p->th[13];
	p->window = rd16(p->th + 14);
	p->payload = seglen - hlen;
	if (hlen > 20) {
		__u32 olen = hlen - 20;
		if (olen > 40 || olen == 0)
			return P_FAIL;
		if (olen == 12 ? LOAD(skb, off + 20, p->th + 20, 12)
				: bpf_skb_load_bytes(skb, off + 20, p->th + 20, olen))
			return P_FAIL;
	}
	if (hlen == 32 && rd32(p->th + 20) == TS_ONLY_MARKER)
		return P_FULL; /* NOP NOP timestamps: nearly every established segment */
	if (hlen > 20 && !options_ok(p, 20, hlen, 1))
		return P_FAIL;
	return P_FULL;
}

static __always_inline int parse_udp(struct __sk_buff *skb, struct pkt *p, __s32 off, __s32 limit,
				     int is_frag)
{
	__u8 h[8];
	__s32 seglen = p->l4len;
	if (seglen < 8 || limit - off < 8)
		return P_FAIL;
	if (LOAD(skb, off, h, 8))
		return P_FAIL;
	__s32 ulen = rd16(h + 4);
	if (ulen == 0 && p->family == 6)
		ulen = seglen;
	if (ulen < 8 || (ulen > seglen && !is_frag))
		return P_FAIL;
	p->l4 = off;
	p->sport = rd16(h);
	p->dport = rd16(h + 2);
	return P_FULL;
}

static __always_inline int parse_icmp(struct __sk_buff *skb, struct pkt *p, __s32 off, __s32 limit)
{
	__u8 h[8];
	if (p->l4len < 8 || limit - off < 8)
		return P_FAIL;
	if (LOAD(skb, off, h, 8))
		return P_FAIL;
	__u8 kind = h[0];
	int echo, error;
	p->l4 = off;
	if (p->proto == 58) {
		echo = kind == 128 || kind == 129;
		error = kind == 1 || kind == 2 || kind == 3 || kind == 4;
	} else {
		echo = kind == 0 || kind == 8;
		error = kind == 3 || kind == 4 || kind == 5 || kind == 11 || kind == 12;
	}
	if (echo) {
		p->echo = 1;
		p->sport = p->dport = rd16(h + 4);
		return P_FULL;
	}
	if (error)
		return P_FAIL; /* an ICMP error quotes a datagram: software relates it */
	p->sport = p->dport = 0;
	return P_KEY_ONLY;
}

static __always_inline int parse_transport(struct __sk_buff *skb, struct pkt *p, __s32 off,
					   __s32 limit, int is_frag)
{
	p->sack_at = -1;
	p->sack_n = 0;
	p->echo = 0;
	if (p->proto == 6)
		return parse_tcp(skb, p, off, limit);
	if (p->proto == 17)
		return parse_udp(skb, p, off, limit, is_frag);
	if (p->proto == 1 || p->proto == 58)
		return parse_icmp(skb, p, off, limit);
	return P_FAIL;
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt *p, __s32 off, __s32 limit)
{
	__u8 *ip = p->ip;
	if (limit - off < 20)
		return P_FAIL;
	if (LOAD(skb, off, ip, 20))
		return P_FAIL;
	__s32 vihl = ip[0];
	__s32 total = rd16(ip + 2);
	__u32 frag = rd16(ip + 6);
	__s32 hlen = (vihl & 0xF) << 2;
	if ((vihl >> 4) != 4 || hlen < 20 || total < 20 || total > limit - off || hlen > total)
		return P_FAIL;
	p->l3 = off;
	p->family = 4;
	p->proto = ip[9];
	p->total = total;
	p->l4len = total - hlen;
	__builtin_memset(p->src, 0, 16);
	__builtin_memset(p->dst, 0, 16);
	__builtin_memcpy(p->src, ip + 12, 4);
	__builtin_memcpy(p->dst, ip + 16, 4);
	p->src_hi = (__u64)rd32(ip + 12) << 32;
	p->src_lo = 0;
	p->dst_hi = (__u64)rd32(ip + 16) << 32;
	p->dst_lo = 0;
	if (hlen > 20) {
		__u32 olen = hlen - 20;
		if (olen > 40 || olen == 0 || off + hlen > limit)
			return P_FAIL;
		if (bpf_skb_load_bytes(skb, off + 20, ip + 20, olen))
			return P_FAIL;
		if (!options_ok(p, 0, olen, 0))
			return P_FAIL;
	}
	if (frag & 0x1FFF)
		return P_FAIL; /* no transport header: the engine does not look it up */
	int is_frag = (frag & 0x2000) != 0;
	int status = parse_transport(skb, p, off + hlen, limit, is_frag);
	if (status == P_FULL && is_frag)
		return P_KEY_ONLY;
	return status;
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, struct pkt *p, __s32 off, __s32 limit)
{
	__u8 *ip = p->ip;
	__u8 h[8];
	if (limit - off < 40)
		return P_FAIL;
	if (LOAD(skb, off, ip, 40))
		return P_FAIL;
	if ((ip[0] >> 4) != 6)
		return P_FAIL;
	__s32 plen = rd16(ip + 4);
	__u32 nxt = ip[6];
	__s32 total = 40 + plen;
	if (plen == 0 && nxt == 0)
		return P_NOT_PORTED; /* a jumbogram's length is in a hop-by-hop option */
	if (total > limit - off)
		return P_FAIL;
	p->l3 = off;
	p->family = 6;
	p->total = total;
	__builtin_memcpy(p->src, ip + 8, 16);
	__builtin_memcpy(p->dst, ip + 24, 16);
	p->src_hi = rd64(ip + 8);
	p->src_lo = rd64(ip + 16);
	p->dst_hi = rd64(ip + 24);
	p->dst_lo = rd64(ip + 32);
	__s32 end = off + total;
	__s32 i = off + 40;
	int extended = 0, is_frag = 0;
	for (int k = 0; k < MAX_EXT; k++) {
		if (!(nxt == 0 || nxt == 43 || nxt == 44 || nxt == 51 || nxt == 60))
			break;
		extended = 1;
		if ((nxt == 0 && i != off + 40) || i + 8 > end || i + 8 > limit)
			return P_FAIL;
		if (LOAD(skb, i, h, 8))
			return P_FAIL;
		if (nxt == 44) {
			__u32 fo = rd16(h + 2);
			if (fo & 0xFFF8)
				return P_FAIL; /* fragment payload, no transport header */
			if (fo & 1)
				is_frag = 1;
			i += 8;
			nxt = h[0];
			continue;
		}
		__s32 size = nxt == 51 ? ((__s32)h[1] + 2) << 2 : ((__s32)h[1] + 1) << 3;
		if (i + size > end || i + size > limit)
			return P_FAIL;
		nxt = h[0];
		i += size;
	}
	if (nxt == 0 || nxt == 43 || nxt == 44 || nxt == 51 || nxt == 60)
		return P_NOT_PORTED;
	p->proto = nxt;
	p->l4len = end - i;
	int status = parse_transport(skb, p, i, limit, is_frag);
	if (status == P_FULL && extended)
		return P_KEY_ONLY;
	return status;
}

FS_GLOBAL int fs_parse_frame(struct __sk_buff *skb, struct pkt *p)
{
	if (!p)
		return P_FAIL;
	__s32 limit = skb->len;
	__u8 w[2];
	if (limit < 14)
		return P_FAIL;
	if (LOAD(skb, 12, w, 2))
		return P_FAIL;
	__u32 et = rd16(w);
	__s32 off = 14;
	for (int k = 0; k < MAX_VLAN; k++) {
		if (!is_vlan(et))
			break;
		if (limit < off + 4)
			return P_FAIL;
		if (LOAD(skb, off + 2, w, 2))
			return P_FAIL;
		et = rd16(w);
		off += 4;
	}
	if (is_vlan(et))
		return P_NOT_PORTED;
	if (et == ETH_P_IPV4)
		return parse_ipv4(skb, p, off, limit);
	if (et == ETH_P_IPV6)
		return parse_ipv6(skb, p, off, limit);
	return P_FAIL;
}
