// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * clustermesh eBPF programs:
 * - cm_connect4 / cm_sendmsg4 / cm_recvmsg4 (cgroup sock_addr): socket load balancing of
 *   service VIPs to one of their active backends, skipping backends ejected by outlier
 *   detection;
 * - cm_sockops (cgroup sock_ops, the same cgroup): the outcome of each TCP connect the load
 *   balancer sent to a backend (established, or closed while the SYN was unanswered), which
 *   ejects a failing backend and re-admits it after a successful trial connection;
 * - cm_from_endpoint / cm_to_endpoint (TC classifier on an endpoint's host-side interface):
 *   identity-based policy, with verdict events on a ring buffer.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "clustermesh.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CM_MAX_SERVICES * 4);
	__type(key, struct cm_service_key);
	__type(value, struct cm_service_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cm_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CM_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct cm_backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cm_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CM_MAX_REVNAT);
	__type(key, struct cm_revnat_key);
	__type(value, struct cm_revnat_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cm_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, CM_MAX_IPCACHE);
	__type(key, struct cm_ipcache_key);
	__type(value, struct cm_ipcache_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cm_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CM_MAX_ENDPOINTS);
	__type(key, __u32);
	__type(value, struct cm_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cm_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CM_MAX_POLICY);
	__type(key, struct cm_policy_key);
	__type(value, struct cm_policy_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cm_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CM_MAX_CT);
	__type(key, struct cm_ct_key);
	__type(value, struct cm_ct_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cm_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, CM_EVENTS_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cm_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cm_lb_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cm_lb_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CM_MAX_HEALTH);
	__type(key, struct cm_health_key);
	__type(value, struct cm_health);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cm_health SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CM_MAX_LB_SOCKS);
	__type(key, __u64);
	__type(value, struct cm_health_key);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cm_lb_socks SEC(".maps");

/* ===== outlier detection ===== */

static __always_inline void cm_report_backend(const struct cm_health_key *k, __u8 verdict,
					      __u32 reason, __u32 failures)
{
	struct cm_event *e = bpf_ringbuf_reserve(&cm_events, sizeof(*e), 0);
	if (!e)
		return;
	struct cm_ipcache_key ik = { .prefixlen = 32, .ip = k->ip };
	struct cm_ipcache_value *peer = bpf_map_lookup_elem(&cm_ipcache, &ik);
	e->time_ns = bpf_ktime_get_ns();
	e->src_ip = 0;
	e->dst_ip = k->ip;
	e->src_identity = 0;
	e->dst_identity = peer ? peer->identity : 0;
	e->src_cluster = 0;
	e->dst_cluster = peer ? peer->cluster_id : 0;
	e->dport = k->port;
	e->proto = k->proto;
	e->direction = CM_DIR_EGRESS;
	e->verdict = verdict;
	e->pad[0] = e->pad[1] = e->pad[2] = 0;
	e->endpoint_id = reason;
	e->rule_id = failures;
	bpf_ringbuf_submit(e, 0);
}

/* Whether a new connection may go to backend `k` now. An ejected backend gets one trial
 * connection per probe interval (half-open); a backend whose connects go unanswered for the
 * window, with no success since, is ejected here (nothing else runs on a timer). */
static __always_inline int cm_admitted(const struct cm_health_key *k, __u64 now,
				       const struct cm_lb_config *cfg)
{
	if (!cfg || cfg->consecutive_failures == 0)
		return 1;
	struct cm_health *h = bpf_map_lookup_elem(&cm_health, k);
	if (!h)
		return 1;
	if (h->ejected_ns) {
		__u32 shift = h->streak < 4 ? h->streak : 4;
		if (now - h->ejected_ns < (cfg->probe_ns << shift))
			return 0;
		/* The trial: the next one only after another interval. */
		h->ejected_ns = now;
		return 1;
	}
	if (h->pending_since_ns && cfg->window_ns && now - h->pending_since_ns >= cfg->window_ns &&
	    h->last_success_ns < h->pending_since_ns) {
		h->ejected_ns = now;
		h->reason = CM_EJECT_TIMEOUT;
		h->streak = 0;
		h->ejections++;
		cm_report_backend(k, CM_EVENT_EJECTED, CM_EJECT_TIMEOUT, h->failures);
		return 0;
	}
	return 1;
}

/* ===== socket load balancing ===== */

/* Picks a backend for ctx's destination. Returns 1 when the destination is no service
 * (leave it), 0 when it is a service without an active backend (refuse), and 2 after
 * rewriting the destination. */
static __always_inline int cm_translate(struct bpf_sock_addr *ctx, __u8 proto, __u32 *vip,
					__u16 *vport)
{
	struct cm_service_key key = {
		.vip = ctx->user_ip4,
		.port = (__u16)ctx->user_port,
		.proto = proto,
		.slot = 0,
	};
	struct cm_service_value *svc = bpf_map_lookup_elem(&cm_services, &key);
	if (!svc)
		return 1;
	if (svc->count == 0)
		return 0;
	*vip = key.vip;
	*vport = key.port;
	__u32 count = svc->count;
	__u32 start = bpf_get_prandom_u32() % count;
	__u32 zero = 0;
	const struct cm_lb_config *cfg = bpf_map_lookup_elem(&cm_lb_config, &zero);
	__u64 now = bpf_ktime_get_ns();
	__u64 netns = bpf_get_netns_cookie(ctx);
	/* The random slot, or the next one whose backend is not ejected; when every one looked
	 * at is ejected, the random slot anyway (panic threshold: a service never loses its last
	 * backends to outlier detection). */
	__u32 fallback_ip = 0;
	__u16 fallback_port = 0;
	int have_fallback = 0;
	for (__u32 i = 0; i < CM_MAX_PICK_TRIES; i++) {
		if (i >= count)
			break;
		key.slot = ((start + i) % count) + 1;
		struct cm_service_value *slot = bpf_map_lookup_elem(&cm_services, &key);
		if (!slot)
			continue;
		__u32 id = slot->backend_id;
		struct cm_backend *be = bpf_map_lookup_elem(&cm_backends, &id);
		if (!be)
			continue;
		if (!have_fallback) {
			fallback_ip = be->ip;
			fallback_port = be->port;
			have_fallback = 1;
		}
		struct cm_health_key hk = {
			.netns = netns, .ip = be->ip, .port = be->port, .proto = proto,
		};
		if (cm_admitted(&hk, now, cfg)) {
			ctx->user_ip4 = be->ip;
			ctx->user_port = be->port;
			return 2;
		}
	}
	if (!have_fallback)
		return 0;
	ctx->user_ip4 = fallback_ip;
	ctx->user_port = fallback_port;
	return 2;
}

static __always_inline __u8 cm_sock_proto(struct bpf_sock_addr *ctx)
{
	return ctx->type == 2 /* SOCK_DGRAM */ ? IPPROTO_UDP : IPPROTO_TCP;
}

SEC("cgroup/connect4")
int cm_connect4(struct bpf_sock_addr *ctx)
{
	__u32 vip;
	__u16 vport;
	__u8 proto = cm_sock_proto(ctx);
	int ret = cm_translate(ctx, proto, &vip, &vport);
	if (ret == 0)
		return 0;
	if (ret == 2 && proto == IPPROTO_TCP) {
		/* cm_sockops learns how this connect ends. */
		__u64 cookie = bpf_get_socket_cookie(ctx);
		struct cm_health_key hk = {
			.netns = bpf_get_netns_cookie(ctx),
			.ip = ctx->user_ip4,
			.port = (__u16)ctx->user_port,
			.proto = IPPROTO_TCP,
		};
		bpf_map_update_elem(&cm_lb_socks, &cookie, &hk, BPF_ANY);
	}
	if (ret == 2 && proto == IPPROTO_UDP) {
		/* A connected UDP socket may still use recvmsg with an address. */
		struct cm_revnat_key rk = {
			.cookie = bpf_get_socket_cookie(ctx),
			.ip = ctx->user_ip4,
			.port = (__u16)ctx->user_port,
		};
		struct cm_revnat_value rv = { .vip = vip, .port = vport };
		bpf_map_update_elem(&cm_revnat, &rk, &rv, BPF_ANY);
	}
	return 1;
}

SEC("cgroup/sendmsg4")
int cm_sendmsg4(struct bpf_sock_addr *ctx)
{
	__u32 vip;
	__u16 vport;
	int ret = cm_translate(ctx, IPPROTO_UDP, &vip, &vport);
	if (ret == 0)
		return 0;
	if (ret == 2) {
		struct cm_revnat_key rk = {
			.cookie = bpf_get_socket_cookie(ctx),
			.ip = ctx->user_ip4,
			.port = (__u16)ctx->user_port,
		};
		struct cm_revnat_value rv = { .vip = vip, .port = vport };
		bpf_map_update_elem(&cm_revnat, &rk, &rv, BPF_ANY);
	}
	return 1;
}

SEC("cgroup/recvmsg4")
int cm_recvmsg4(struct bpf_sock_addr *ctx)
{
	struct cm_revnat_key rk = {
		.cookie = bpf_get_socket_cookie(ctx),
		.ip = ctx->user_ip4,
		.port = (__u16)ctx->user_port,
	};
	struct cm_revnat_value *rv = bpf_map_lookup_elem(&cm_revnat, &rk);
	if (rv) {
		ctx->user_ip4 = rv->vip;
		ctx->user_port = rv->port;
	}
	return 1;
}

/* The outcome of the TCP connects the load balancer sent to a backend. */
SEC("sockops")
int cm_sockops(struct bpf_sock_ops *skops)
{
	__u32 op = skops->op;
	if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    op != BPF_SOCK_OPS_STATE_CB)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct cm_health_key *kp = bpf_map_lookup_elem(&cm_lb_socks, &cookie);
	if (!kp)
		return 1;
	struct cm_health_key k = *kp;
	__u64 now = bpf_ktime_get_ns();
	__u32 zero = 0;
	const struct cm_lb_config *cfg = bpf_map_lookup_elem(&cm_lb_config, &zero);
	struct cm_health *h = bpf_map_lookup_elem(&cm_health, &k);

	if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
		/* The SYN goes out: follow the socket's state to learn how it ends. */
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		if (!h) {
			struct cm_health nh = { .pending_since_ns = now };
			bpf_map_update_elem(&cm_health, &k, &nh, BPF_NOEXIST);
		} else if (!h->pending_since_ns) {
			h->pending_since_ns = now;
		}
		return 1;
	}
	if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		bpf_sock_ops_cb_flags_set(skops, 0);
		bpf_map_delete_elem(&cm_lb_socks, &cookie);
		if (!h)
			return 1;
		__u32 was_ejected = h->ejected_ns != 0;
		h->failures = 0;
		h->pending_since_ns = 0;
		h->last_success_ns = now;
		h->ejected_ns = 0;
		h->streak = 0;
		if (was_ejected)
			cm_report_backend(&k, CM_EVENT_READMITTED, h->reason, 0);
		return 1;
	}
	/* BPF_SOCK_OPS_STATE_CB: args[0] the old state, args[1] the new one. */
	if (skops->args[1] != BPF_TCP_CLOSE)
		return 1;
	bpf_map_delete_elem(&cm_lb_socks, &cookie);
	if (skops->args[0] != BPF_TCP_SYN_SENT || !h)
		return 1;
	/* Refused, unreachable, timed out, or given up by the client before an answer. */
	h->failures++;
	h->last_failure_ns = now;
	if (h->ejected_ns) {
		/* A failed trial: out for twice as long as before. */
		h->ejected_ns = now;
		h->streak++;
		return 1;
	}
	if (cfg && cfg->consecutive_failures && h->failures >= cfg->consecutive_failures) {
		h->ejected_ns = now;
		h->reason = CM_EJECT_FAILURES;
		h->streak = 0;
		h->ejections++;
		cm_report_backend(&k, CM_EVENT_EJECTED, CM_EJECT_FAILURES, h->failures);
	}
	return 1;
}

/* ===== policy ===== */

struct cm_flow {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	/* What policy matches on (network order): the destination port, or for ICMP the
	 * message type. Conntrack keys use sport/dport, which are 0 for ICMP. */
	__u16 policy_port;
	__u8 proto;
	__u8 syn_only; /* TCP SYN without ACK: a new connection */
	__u8 ct_mode;  /* CM_CT_*: how conntrack may be used for this packet */
};

/* Conntrack use: replies pass by it and allowed flows are recorded (TCP, UDP, other
 * protocols); an ICMP echo request is recorded but never taken for a reply; an echo reply
 * only passes as the reply of a recorded request; other ICMP messages (errors, later
 * fragments) never use it, so a recorded exchange cannot carry them past policy. */
#define CM_CT_BOTH 0
#define CM_CT_RECORD 1
#define CM_CT_REPLY 2
#define CM_CT_NONE 3

/* cm_parse: not IPv4 (passes), and IPv4 whose headers cannot be read (dropped where
 * enforced: it cannot be matched against policy). */
#define CM_PARSE_NOT_IPV4 -1
#define CM_PARSE_MALFORMED -2

static __always_inline int cm_parse(struct __sk_buff *skb, struct cm_flow *f)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return CM_PARSE_NOT_IPV4;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl < 5)
		return CM_PARSE_NOT_IPV4; /* no addresses to find an endpoint by; the stack drops it */
	f->ct_mode = CM_CT_BOTH;
	f->saddr = ip->saddr;
	f->daddr = ip->daddr;
	f->proto = ip->protocol;
	f->sport = 0;
	f->dport = 0;
	f->policy_port = 0;
	f->syn_only = 0;
	void *l4 = (void *)ip + ip->ihl * 4;
	if (ip->frag_off & bpf_htons(0x1fff)) {
		/* Later fragments carry no ports; an ICMP one no type: 256 matches no type rule. */
		if (ip->protocol == IPPROTO_ICMP) {
			f->policy_port = bpf_htons(256);
			f->ct_mode = CM_CT_NONE;
		}
		return 0;
	}
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > end)
			return CM_PARSE_MALFORMED;
		f->sport = tcp->source;
		f->dport = tcp->dest;
		f->syn_only = tcp->syn && !tcp->ack;
	} else if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > end)
			return CM_PARSE_MALFORMED;
		f->sport = udp->source;
		f->dport = udp->dest;
	} else if (ip->protocol == IPPROTO_ICMP) {
		/* type, code, checksum, then (echo) identifier and sequence. */
		__u8 *icmp = l4;
		if ((void *)(icmp + 8) > end)
			return CM_PARSE_MALFORMED;
		f->policy_port = bpf_htons(icmp[0]);
		/* Conntrack tells echo exchanges apart by their identifier: a request's is its
		 * "source port", a reply's its "destination port", so that a reply matches its
		 * request reversed. */
		__u16 id = (__u16)icmp[4] | ((__u16)icmp[5] << 8);
		if (icmp[0] == 8) {
			f->sport = id;
			f->ct_mode = CM_CT_RECORD;
		} else if (icmp[0] == 0) {
			f->dport = id;
			f->ct_mode = CM_CT_REPLY;
		} else {
			f->ct_mode = CM_CT_NONE;
		}
		return 0;
	}
	f->policy_port = f->dport;
	return 0;
}

static __always_inline void cm_consider(struct cm_policy_key *k, __u8 *best, __u32 *best_rule)
{
	struct cm_policy_value *v = bpf_map_lookup_elem(&cm_policy, k);
	if (!v)
		return;
	__u8 rank = v->verdict == CM_VERDICT_DENY ? 3 : v->verdict == CM_VERDICT_ALLOW ? 2 : 1;
	__u8 best_rank = *best == CM_VERDICT_DENY ? 3 : *best == CM_VERDICT_ALLOW ? 2 : *best ? 1 : 0;
	if (rank > best_rank) {
		*best = v->verdict;
		*best_rule = v->rule_id;
	}
}

/* blocks: the endpoint's port block sizes in use (bit k-1: aligned blocks of 2^k ports, a
 * port range's pieces); their entries carry k in bits 1..5 of the direction byte. */
static __always_inline __u8 cm_lookup_verdict(__u32 ep, __u32 identity, __u16 port, __u8 proto,
					      __u8 dir, __u16 blocks, __u32 *rule_id)
{
	/* Exact, any port, any identity, any identity and port. Deny wins over allow, allow
	 * over audit. */
	struct cm_policy_key keys[4] = {
		{ .endpoint_id = ep, .identity = identity, .port = port, .proto = proto, .direction = dir },
		{ .endpoint_id = ep, .identity = identity, .port = 0, .proto = 0, .direction = dir },
		{ .endpoint_id = ep, .identity = 0, .port = port, .proto = proto, .direction = dir },
		{ .endpoint_id = ep, .identity = 0, .port = 0, .proto = 0, .direction = dir },
	};
	__u8 best = 0;
	__u32 best_rule = 0;
#pragma unroll
	for (int i = 0; i < 4; i++)
		cm_consider(&keys[i], &best, &best_rule);
	if (blocks) {
		__u16 host_port = bpf_ntohs(port);
#pragma unroll
		for (int k = 1; k <= 16; k++) {
			if (!(blocks & (1 << (k - 1))))
				continue;
			__u16 start = (__u16)(host_port & ~((1u << k) - 1));
			struct cm_policy_key bk = {
				.endpoint_id = ep, .identity = identity, .port = bpf_htons(start),
				.proto = proto, .direction = (__u8)(dir | (k << 1)),
			};
			cm_consider(&bk, &best, &best_rule);
			bk.identity = 0;
			cm_consider(&bk, &best, &best_rule);
		}
	}
	*rule_id = best_rule;
	return best;
}

static __always_inline void cm_report(const struct cm_flow *f, __u32 src_id, __u32 dst_id,
				      __u16 src_cluster, __u16 dst_cluster, __u8 dir,
				      __u8 verdict, __u32 ep, __u32 rule)
{
	struct cm_event *e = bpf_ringbuf_reserve(&cm_events, sizeof(*e), 0);
	if (!e)
		return;
	e->time_ns = bpf_ktime_get_ns();
	e->src_ip = f->saddr;
	e->dst_ip = f->daddr;
	e->src_identity = src_id;
	e->dst_identity = dst_id;
	e->src_cluster = src_cluster;
	e->dst_cluster = dst_cluster;
	e->dport = f->policy_port;
	e->proto = f->proto;
	e->direction = dir;
	e->verdict = verdict;
	e->pad[0] = e->pad[1] = e->pad[2] = 0;
	e->endpoint_id = ep;
	e->rule_id = rule;
	bpf_ringbuf_submit(e, 0);
}

/* dir: the local endpoint's direction. CM_DIR_EGRESS: the packet leaves the endpoint
 * (its source is local); CM_DIR_INGRESS: the packet goes to it. */
static __always_inline int cm_enforce(struct __sk_buff *skb, __u8 dir)
{
	struct cm_flow f;
	int parsed = cm_parse(skb, &f);
	if (parsed == CM_PARSE_MALFORMED) {
		/* The L4 header may be in paged data: pull it into the linear part and look
		 * again. Only here, not for every packet (pulling can copy a cloned packet). */
		__u32 want = sizeof(struct ethhdr) + 60 + sizeof(struct tcphdr);
		if (bpf_skb_pull_data(skb, skb->len < want ? skb->len : want) == 0)
			parsed = cm_parse(skb, &f);
	}
	if (parsed == CM_PARSE_NOT_IPV4)
		return TC_ACT_OK;
	__u32 local_ip = dir == CM_DIR_EGRESS ? f.saddr : f.daddr;
	__u32 peer_ip = dir == CM_DIR_EGRESS ? f.daddr : f.saddr;
	struct cm_endpoint *ep = bpf_map_lookup_elem(&cm_endpoints, &local_ip);
	if (!ep)
		return TC_ACT_OK;
	__u32 enforce = dir == CM_DIR_EGRESS ? CM_ENFORCE_EGRESS : CM_ENFORCE_INGRESS;
	__u32 audit = dir == CM_DIR_EGRESS ? CM_AUDIT_EGRESS : CM_AUDIT_INGRESS;
	if (!(ep->flags & (enforce | audit))) {
		/* This direction is open. When the other one is enforced, the flow is recorded
		 * all the same: its replies pass there (a server whose egress is enforced
		 * answers the connections its open ingress let in). */
		__u32 other = dir == CM_DIR_EGRESS ? CM_ENFORCE_INGRESS | CM_AUDIT_INGRESS :
						     CM_ENFORCE_EGRESS | CM_AUDIT_EGRESS;
		if ((ep->flags & other) && parsed >= 0 &&
		    (f.ct_mode == CM_CT_BOTH || f.ct_mode == CM_CT_RECORD)) {
			__u64 now = bpf_ktime_get_ns();
			/* A packet of a flow already known either way only refreshes it. */
			struct cm_ct_key back = {
				.saddr = f.daddr, .daddr = f.saddr, .sport = f.dport,
				.dport = f.sport, .proto = f.proto,
			};
			struct cm_ct_key open = {
				.saddr = f.saddr, .daddr = f.daddr, .sport = f.sport,
				.dport = f.dport, .proto = f.proto,
			};
			struct cm_ct_value *ct = bpf_map_lookup_elem(&cm_ct, &back);
			if (!ct)
				ct = bpf_map_lookup_elem(&cm_ct, &open);
			if (ct) {
				ct->last_seen_ns = now | (ct->last_seen_ns & CM_CT_OPEN_MARK);
			} else {
				/* Marked: the peer's enforcing side still reports the flow's first
				 * verdict (it is not a flow an enforcing side has seen). */
				struct cm_ct_value nv = { .last_seen_ns = now | CM_CT_OPEN_MARK };
				bpf_map_update_elem(&cm_ct, &open, &nv, BPF_ANY);
			}
		}
		return TC_ACT_OK;
	}
	/* Headers that cannot be read cannot be matched: dropped where enforced. */
	if (parsed < 0)
		return (ep->flags & enforce) ? TC_ACT_SHOT : TC_ACT_OK;

	/* Replies of flows this endpoint's policy allowed pass. */
	if (f.ct_mode == CM_CT_BOTH || f.ct_mode == CM_CT_REPLY) {
		struct cm_ct_key reply = {
			.saddr = f.daddr, .daddr = f.saddr, .sport = f.dport, .dport = f.sport,
			.proto = f.proto,
		};
		struct cm_ct_value *ct = bpf_map_lookup_elem(&cm_ct, &reply);
		if (ct) {
			ct->last_seen_ns =
				bpf_ktime_get_ns() | (ct->last_seen_ns & CM_CT_OPEN_MARK);
			return TC_ACT_OK;
		}
	}
	struct cm_ct_key fwd = {
		.saddr = f.saddr, .daddr = f.daddr, .sport = f.sport, .dport = f.dport, .proto = f.proto,
	};
	int record = f.ct_mode == CM_CT_BOTH || f.ct_mode == CM_CT_RECORD;
	/* Known: recorded by an enforcing side (an entry an open direction made does not count,
	 * so this side still checks and reports the flow's first packet). */
	struct cm_ct_value *seen = record ? bpf_map_lookup_elem(&cm_ct, &fwd) : 0;
	int known_flow = seen && !(seen->last_seen_ns & CM_CT_OPEN_MARK);

	struct cm_ipcache_key ik = { .prefixlen = 32, .ip = peer_ip };
	struct cm_ipcache_value *peer = bpf_map_lookup_elem(&cm_ipcache, &ik);
	__u32 peer_id = peer ? peer->identity : 2 /* world */;
	__u16 peer_cluster = peer ? peer->cluster_id : 0;

	__u32 rule = 0;
	__u8 v = cm_lookup_verdict(ep->endpoint_id, peer_id, f.policy_port, f.proto, dir,
				   (__u16)(ep->flags >> 16), &rule);
	__u8 outcome;
	if (v == CM_VERDICT_ALLOW)
		outcome = CM_EVENT_ALLOWED;
	else if (v == CM_VERDICT_AUDIT)
		outcome = CM_EVENT_AUDITED;
	else /* deny, or nothing matched: default deny */
		outcome = (ep->flags & audit) ? CM_EVENT_AUDITED : CM_EVENT_DENIED;
	if (!(ep->flags & enforce) && outcome == CM_EVENT_DENIED)
		outcome = CM_EVENT_AUDITED;

	__u32 src_id = dir == CM_DIR_EGRESS ? ep->identity : peer_id;
	__u32 dst_id = dir == CM_DIR_EGRESS ? peer_id : ep->identity;
	__u16 src_cl = dir == CM_DIR_EGRESS ? ep->cluster_id : peer_cluster;
	__u16 dst_cl = dir == CM_DIR_EGRESS ? peer_cluster : ep->cluster_id;

	if (outcome == CM_EVENT_DENIED) {
		cm_report(&f, src_id, dst_id, src_cl, dst_cl, dir, outcome, ep->endpoint_id, rule);
		return TC_ACT_SHOT;
	}
	if (!known_flow) {
		if (record) {
			struct cm_ct_value nv = { .last_seen_ns = bpf_ktime_get_ns() & ~CM_CT_OPEN_MARK };
			bpf_map_update_elem(&cm_ct, &fwd, &nv, BPF_ANY);
		}
		cm_report(&f, src_id, dst_id, src_cl, dst_cl, dir, outcome, ep->endpoint_id, rule);
	}
	return TC_ACT_OK;
}

/* On the host side of an endpoint's veth, TC ingress sees what the endpoint sends. */
SEC("classifier")
int cm_from_endpoint(struct __sk_buff *skb)
{
	return cm_enforce(skb, CM_DIR_EGRESS);
}

/* TC egress of the host-side veth sees what is delivered to the endpoint. */
SEC("classifier")
int cm_to_endpoint(struct __sk_buff *skb)
{
	return cm_enforce(skb, CM_DIR_INGRESS);
}
