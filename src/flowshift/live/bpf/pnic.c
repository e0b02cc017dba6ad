// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The PNIC as an eBPF program at tc (clsact) ingress of a port.
 *
 * The compiled PNIC engine's pipeline (tiers/pnic_engine.py, docs/pnic-engine.md): parse,
 * classify (machine = zone), look up the second cache (the flows map, both keys of each
 * entry), then on a hit the flow's chain exactly as the engine runs it: TCP window tracking
 * and timeouts, UDP/ICMP echo, counters, the NAT/LB rewrite with RFC 1624 checksum updates.
 * A processed packet is redirected to its egress port with the port table's Ethernet
 * addresses (or dropped: conntrack INVALID); every other packet is punted to the VNIC's device
 * and counted by PuntReason. docs/datapath.md describes maps, verdicts and the handoff.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

#include "fs_consts.h"
#include "pnic_maps.h"
#include "pnic_parse.h"
#include "pnic_flow.h"

#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define ETH_P_8021Q 0x8100
#define CHECKSUM_COMPLETE 2
#define CHECKSUM_PARTIAL 3

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FLOWS_MAX);
	__type(key, struct flow_key);
	__type(value, struct flow_entry);
} fs_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FLOWS_MAX);
	__type(key, struct flow_key);
	__type(value, struct flow_key);
} fs_replies SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FLOWS_MAX);
	__type(key, struct flow_key);
	__type(value, struct flow_hold);
} fs_holds SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fs_config);
} fs_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_PORTS);
	__type(key, __u32);
	__type(value, struct fs_port);
} fs_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PUNT_MAX + 1);
	__type(key, __u32);
	__type(value, __u64);
} fs_punts SEC(".maps");

/* the packet's parsed headers: too large for the 512-byte stack */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pkt);
} fs_scratch SEC(".maps");

static __always_inline void count(__u32 index)
{
	__u64 *n = bpf_map_lookup_elem(&fs_punts, &index);
	if (n)
		*n += 1;
}

/* Classifier._inside: the first machine whose range holds the address, or -1 */
static __always_inline int inside(struct fs_config *cfg, __u32 family, __u64 hi, __u64 lo)
{
	if (family == 4) {
		lo = hi >> 32;
		hi = 0;
	}
	for (int j = 0; j < MAX_RANGES; j++) {
		if (j >= cfg->n_ranges)
			break;
		struct fs_range *r = &cfg->ranges[j];
		if (r->family != family)
			continue;
		int above = r->lo_hi < hi || (r->lo_hi == hi && r->lo_lo <= lo);
		int below = hi < r->hi_hi || (hi == r->hi_hi && lo <= r->hi_lo);
		if (above && below)
			return r->machine;
	}
	return -1;
}

/* Classifier.classify: the machine (-1 none) and *direction 0 egress / 1 ingress */
static __always_inline int classify(struct fs_config *cfg, struct pkt *p, __u32 *direction)
{
	int m = inside(cfg, p->family, p->src_hi, p->src_lo);
	*direction = 0;
	if (m >= 0)
		return m;
	*direction = 1;
	for (int j = 0; j < MAX_PUBLIC; j++) {
		if (j >= cfg->n_public)
			break;
		struct fs_public *a = &cfg->public[j];
		if (a->family == p->family && a->hi == p->dst_hi && a->lo == p->dst_lo)
			return a->machine;
	}
	return inside(cfg, p->family, p->dst_hi, p->dst_lo);
}

static __always_inline int punt(struct __sk_buff *skb, struct fs_config *cfg, __u32 reason)
{
	count(reason);
	skb->cb[CB_KIND] = RESULT_PUNT;
	skb->cb[CB_CODE] = reason;
	skb->cb[CB_IFINDEX] = cfg->punt_ifindex;
	if (cfg->tag_punts)
		bpf_skb_vlan_push(skb, bpf_htons(ETH_P_8021Q), reason);
	return bpf_redirect(cfg->punt_ifindex, 0);
}

SEC("tc")
int pnic_ingress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct fs_config *cfg = bpf_map_lookup_elem(&fs_config, &zero);
	if (!cfg)
		return TC_ACT_OK;
	__s64 now = cfg->clock == CLOCK_TSTAMP ? (__s64)skb->tstamp : (__s64)bpf_ktime_get_ns();
	if (cfg->mode == MODE_PUNT_ALL)
		return punt(skb, cfg, PUNT_MISS);

	struct pkt *pp = bpf_map_lookup_elem(&fs_scratch, &zero);
	if (!pp)
		return TC_ACT_OK;
	int status = fs_parse_frame(skb, pp);
	/* CO-RE: how the kernel holds this skb's L4 checksum (test runs: CHECKSUM_NONE) */
	struct sk_buff *kskb = bpf_cast_to_kern_ctx(skb);
	__u32 summed = BPF_CORE_READ_BITFIELD(kskb, ip_summed);
	pp->partial = summed == CHECKSUM_PARTIAL;
	pp->complete = summed == CHECKSUM_COMPLETE;
	if (status == P_FAIL || status == P_NOT_PORTED)
		return punt(skb, cfg, PUNT_UNSUPPORTED);
	__u32 direction;
	int m = classify(cfg, pp, &direction);
	if (m < 0)
		return punt(skb, cfg, PUNT_MISS); /* no machine's: no entry can be its, as the engine */

	struct flow_key key = {
		.family = pp->family, .proto = pp->proto, .zone = m, .sport = pp->sport, .dport = pp->dport,
	};
	__builtin_memcpy(key.src, pp->src, 16);
	__builtin_memcpy(key.dst, pp->dst, 16);
	__u32 d = 0;
	struct flow_key okey = key;
	struct flow_entry *e = bpf_map_lookup_elem(&fs_flows, &key);
	if (!e) {
		struct flow_key *orig = bpf_map_lookup_elem(&fs_replies, &key);
		if (!orig)
			return punt(skb, cfg, PUNT_MISS);
		okey = *orig;
		e = bpf_map_lookup_elem(&fs_flows, &okey);
		if (!e)
			return punt(skb, cfg, PUNT_MISS);
		d = 1;
	}

	/* The flow's record: its lock serializes the packets of the flow (two directions arrive
	 * at two ports, maybe on two CPUs) and the VNIC's handoff operations (hold_ctl). */
	struct flow_hold *h = bpf_map_lookup_elem(&fs_holds, &okey);
	if (!h)
		return punt(skb, cfg, PUNT_MISS); /* not inserted through the control API */
	__u32 why = 0, reason = 0;
	int verdict = VERDICT_FORWARD;
	bpf_spin_lock(&h->lock);
	if (h->state == HOLD_HELD) {
		h->inflight += 1; /* counted in the same critical section that saw HELD */
		why = PUNT_HELD;
	} else if (h->state == HOLD_RETURNED) {
		why = PUNT_MISS; /* as the engine, whose index no longer has it */
	} else {
		if (status != P_FULL)
			why = PUNT_UNSUPPORTED;
		else if (e->expires <= now)
			why = PUNT_EXPIRED;
		else if (e->proto == 6 && (pp->flags & (TH_SYN | TH_FIN | TH_RST)))
			why = PUNT_LIFE;
		else if (e->proto == 6 && e->tcp_state >= TCP_STATE_COUNT)
			why = PUNT_UNSUPPORTED;
		else if (pp->partial && e->proto != 6 && e->proto != 17)
			why = PUNT_UNSUPPORTED; /* no pseudo-header: no partial checksum to keep */
		if (why)
			h->state = HOLD_RETURNED; /* the engine's "returned": the VNIC takes it */
		else
			verdict = track_flow(e, d, pp, now, &reason);
	}
	bpf_spin_unlock(&h->lock);
	if (why)
		return punt(skb, cfg, why);
	if (verdict == VERDICT_FORWARD)
		fs_translate(skb, e, d, pp); /* reads only the entry's keys, which never change */
	skb->cb[CB_CODE] = reason;
	skb->cb[CB_MACHINE] = m;
	skb->cb[CB_DIRECTION] = direction;
	if (verdict == VERDICT_DROP) {
		count(PUNT_MAX);
		skb->cb[CB_KIND] = RESULT_DROP;
		return TC_ACT_SHOT;
	}
	count(0);
	skb->cb[CB_KIND] = RESULT_FORWARD;
	__u32 port = direction ? 1 + (__u32)m : 0;
	struct fs_port *out = bpf_map_lookup_elem(&fs_ports, &port);
	if (!out) {
		skb->cb[CB_IFINDEX] = 0;
		return TC_ACT_SHOT;
	}
	__u8 macs[12];
	__builtin_memcpy(macs, out->dst_mac, 6);
	__builtin_memcpy(macs + 6, out->src_mac, 6);
	store_hdr(skb, 0, macs, 12, !pp->complete);
	skb->cb[CB_IFINDEX] = out->ifindex;
	return bpf_redirect(out->ifindex, 0);
}

/* The VNIC's side of the handoff (BPF_PROG_TEST_RUN with a struct hold_op): userspace cannot
 * take a bpf_spin_lock, so its read-modify-writes of a hold record run here, under the lock
 * the datapath takes. Returns: HANDLED the count left (-1 none to handle), RELEASE 1 switched
 * to the fast path / 0 punts still in flight / -1 not held, READ state << 16 | inflight;
 * -2 no record. */
SEC("syscall")
int hold_ctl(struct hold_op *op)
{
	struct flow_key key = op->key;
	struct flow_hold *h = bpf_map_lookup_elem(&fs_holds, &key);
	if (!h)
		return -2;
	__u32 which = op->op;
	int ret = -1;
	bpf_spin_lock(&h->lock);
	if (which == HOLD_OP_HANDLED) {
		if (h->inflight > 0) {
			h->inflight -= 1;
			ret = h->inflight;
		}
	} else if (which == HOLD_OP_RELEASE) {
		if (h->state == HOLD_HELD) {
			ret = h->inflight == 0;
			if (ret)
				h->state = HOLD_FAST;
		}
	} else if (which == HOLD_OP_READ) {
		ret = (h->state << 16) | (h->inflight & 0xFFFF);
	}
	bpf_spin_unlock(&h->lock);
	return ret;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
