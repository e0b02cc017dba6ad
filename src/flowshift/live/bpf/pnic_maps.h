/* The datapath's maps and the records they hold (what userspace reads and writes).
 *
 * fs_flows:   original key -> struct flow_entry (the second cache; sized to the capacity)
 * fs_replies: reply key (the reverse of the entry's rewrite) -> original key
 * fs_holds:   original key -> struct flow_hold, present while a flow is held or returned
 * fs_config:  one struct fs_config (mode, clock, punt device, the machines' addresses)
 * fs_ports:   port index -> struct fs_port (0 the uplink, 1 + m machine m's port)
 * fs_punts:   per-CPU packet counts by PuntReason (index 0: forwarded, PUNT_MAX: dropped)
 *
 * Every integer is host order (little-endian) unless named *_be; addresses are 16 bytes as in
 * the flow entry (IPv4 in the first 4). docs/datapath.md describes each map.
 */
#pragma once

#ifndef FLOWS_MAX
#define FLOWS_MAX 1024 /* the loader sets the real size (the capacity) before loading */
#endif

#define MAX_RANGES 64
#define MAX_PUBLIC 64
#define MAX_PORTS 257

/* config.mode */
#define MODE_FAST 0
#define MODE_PUNT_ALL 1

/* config.clock: where `now` comes from */
#define CLOCK_MONO 0 /* bpf_ktime_get_ns(): the live runtime's clock */
#define CLOCK_TSTAMP 1 /* skb->tstamp: test runs drive trace time packet by packet */

/* flow_hold.state */
#define HOLD_FAST 0 /* released: the fast path runs the flow */
#define HOLD_HELD 1 /* in transit: every packet is punted (PUNT_HELD) and counted */
#define HOLD_RETURNED 2 /* the datapath handed the flow back: packets miss until taken */

/* hold_op.op */
#define HOLD_OP_HANDLED 1 /* the VNIC handled one HELD punt: inflight - 1 */
#define HOLD_OP_RELEASE 2 /* switch HELD -> FAST if inflight is 0 */
#define HOLD_OP_READ 3 /* state << 32 | inflight, under the lock */

/* skb->cb[] after a run: what the program did (read back by BPF_PROG_TEST_RUN) */
#define CB_KIND 0 /* RESULT_* */
#define CB_CODE 1 /* Reason (forward/drop) or PuntReason (punt) */
#define CB_IFINDEX 2 /* the device redirected to */
#define CB_MACHINE 3
#define CB_DIRECTION 4 /* 0 egress, 1 ingress */
#define RESULT_FORWARD 1
#define RESULT_DROP 2
#define RESULT_PUNT 3

struct fs_range {
	__u32 family;
	__u32 machine;
	__u64 lo_hi, lo_lo; /* the range's first address as two big-endian words */
	__u64 hi_hi, hi_lo; /* its last (IPv4: the value in the *_lo word, *_hi 0) */
};

struct fs_public {
	__u32 family;
	__u32 machine;
	__u64 hi, lo; /* the address as two big-endian words (IPv4: top 32 bits of hi) */
};

struct fs_config {
	__u32 mode;
	__u32 clock;
	__u32 punt_ifindex;
	__u32 tag_punts; /* mark punts with VLAN tag VID = PuntReason (see docs/datapath.md) */
	__u32 n_ranges;
	__u32 n_public;
	struct fs_range ranges[MAX_RANGES];
	struct fs_public public[MAX_PUBLIC];
};

struct fs_port {
	__u32 ifindex;
	__u8 src_mac[6];
	__u8 dst_mac[6];
};

struct flow_hold {
	struct bpf_spin_lock lock;
	__u32 state;
	__u32 inflight;
	__u32 reserved;
};

struct hold_op {
	struct flow_key key;
	__u32 op;
	__u32 pad;
};
