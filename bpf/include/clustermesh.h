/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * clustermesh datapath map layouts: the one definition of every key and value struct.
 * Mirrored by #[repr(C)] structs in bpf/src/layout.rs with compile-time size checks.
 *
 * Byte order: IPv4 addresses and ports are in network byte order, exactly as the kernel
 * hands them to the programs (sock_addr ctx, IP and L4 headers), so that no program
 * converts on the hot path. Everything else is host order.
 *
 * Maps (pinned under <bpf-root>/<cluster>/<node>/):
 *   cm_services   hash     cm_service_key  -> cm_service_value
 *   cm_backends   hash     __u32 id        -> cm_backend
 *   cm_revnat     lru hash cm_revnat_key   -> cm_revnat_value  (UDP replies appear from the VIP)
 *   cm_ipcache    lpm trie cm_ipcache_key  -> cm_ipcache_value
 *   cm_endpoints  hash     __u32 ip        -> cm_endpoint
 *   cm_policy     hash     cm_policy_key   -> cm_policy_value
 *   cm_ct         lru hash cm_ct_key       -> cm_ct_value      (replies of allowed flows pass)
 *   cm_events     ring buffer of cm_event
 *   cm_lb_config  array    0               -> cm_lb_config     (outlier detection settings)
 *   cm_health     lru hash cm_health_key   -> cm_health        (per-backend connect outcomes)
 *   cm_lb_socks   lru hash __u64 cookie    -> cm_health_key    (sockets the LB sent to a backend)
 */
#ifndef CLUSTERMESH_H
#define CLUSTERMESH_H

#include <linux/types.h>

#define CM_MAX_SERVICES 65536
#define CM_MAX_BACKENDS 262144
#define CM_MAX_IPCACHE 1048576
#define CM_MAX_ENDPOINTS 4096
#define CM_MAX_POLICY 262144
#define CM_MAX_CT 262144
#define CM_MAX_REVNAT 65536
#define CM_EVENTS_BYTES (1 << 22)
#define CM_MAX_HEALTH 65536
#define CM_MAX_LB_SOCKS 65536
/* Slots a connect looks at for a backend that is not ejected before it falls back (panic). */
#define CM_MAX_PICK_TRIES 32

/* A service frontend. slot 0 is the service entry (count of backends); slots 1..=count
 * name one backend each. */
struct cm_service_key {
	__u32 vip;      /* network order */
	__u16 port;     /* network order */
	__u8 proto;     /* IPPROTO_TCP, IPPROTO_UDP */
	__u8 pad;
	__u32 slot;
};

struct cm_service_value {
	__u32 backend_id; /* slots >= 1 */
	__u16 count;      /* slot 0: number of active backends */
	__u16 flags;
};

#define CM_BACKEND_ACTIVE 1
#define CM_BACKEND_TERMINATING 2
#define CM_BACKEND_QUARANTINED 3

struct cm_backend {
	__u32 ip;         /* network order */
	__u16 port;       /* network order */
	__u8 proto;
	__u8 state;       /* CM_BACKEND_* */
	__u16 cluster_id;
	__u16 pad;
};

struct cm_revnat_key {
	__u64 cookie;     /* socket cookie */
	__u32 ip;         /* backend, network order */
	__u16 port;       /* backend, network order */
	__u16 pad;
};

struct cm_revnat_value {
	__u32 vip;
	__u16 port;
	__u16 pad;
};

struct cm_ipcache_key {
	__u32 prefixlen;  /* LPM trie: bits that count, 0..=32 */
	__u32 ip;         /* network order */
};

struct cm_ipcache_value {
	__u32 identity;
	__u32 node_ip;    /* network order; 0 when unknown */
	__u16 cluster_id;
	__u16 pad;
};

/* Outlier detection (failure accrual) settings, written by the agent; all zero: off. */
struct cm_lb_config {
	__u32 consecutive_failures; /* failed connects that eject a backend; 0: accrual off */
	__u32 pad;
	__u64 window_ns;      /* a connect unanswered this long, with no success since: ejected */
	__u64 probe_ns;       /* an ejected backend gets one trial connection after this long,
			       * doubled after each failed trial up to 16 times as long */
};

/* A backend as one client network namespace sees it (after the LB rewrote the destination).
 * Per client, not per node: a pod that gives up its own connects (or whose connects its
 * policy drops) must not steer the other pods' traffic away from a backend. */
struct cm_health_key {
	__u64 netns;      /* bpf_get_netns_cookie of the connecting socket */
	__u32 ip;         /* network order */
	__u16 port;       /* network order */
	__u8 proto;
	__u8 pad;
};

#define CM_EJECT_FAILURES 1 /* consecutive failed connects */
#define CM_EJECT_TIMEOUT 2  /* a connect unanswered for the window */

struct cm_health {
	__u64 last_failure_ns;  /* bpf_ktime_get_ns; 0: never */
	__u64 last_success_ns;
	__u64 pending_since_ns; /* the oldest connect started since the last success; 0: none */
	__u64 ejected_ns;       /* when ejected (or last given a trial connection); 0: admitted */
	__u32 failures;         /* consecutive failed connects */
	__u32 ejections;        /* times ejected */
	__u32 reason;           /* CM_EJECT_* of the current ejection */
	__u32 streak;           /* failed trials of the current ejection (the wait doubles) */
};

#define CM_ENFORCE_INGRESS (1 << 0)
#define CM_ENFORCE_EGRESS (1 << 1)
#define CM_AUDIT_INGRESS (1 << 2) /* default-deny verdicts pass and are reported */
#define CM_AUDIT_EGRESS (1 << 3)

struct cm_endpoint {
	__u32 endpoint_id;
	__u32 identity;
	__u32 flags;      /* CM_ENFORCE_*, CM_AUDIT_* */
	__u16 cluster_id;
	__u16 pad;
};

#define CM_DIR_INGRESS 0
#define CM_DIR_EGRESS 1

/* identity 0 = any identity; port 0 and proto 0 = any port and protocol. */
struct cm_policy_key {
	__u32 endpoint_id;
	__u32 identity;
	__u16 port;       /* network order */
	__u8 proto;
	__u8 direction;   /* CM_DIR_* in bit 0; bits 1..5: k, the entry covers the aligned
	                   * block of 2^k ports that starts at port (a port range's piece) */
};

#define CM_VERDICT_ALLOW 1
#define CM_VERDICT_DENY 2
#define CM_VERDICT_AUDIT 3

struct cm_policy_value {
	__u8 verdict;     /* CM_VERDICT_* */
	__u8 pad[3];
	__u32 rule_id;    /* opaque to the datapath; reported in events */
};

struct cm_ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct cm_ct_value {
	__u64 last_seen_ns; /* its lowest bit is CM_CT_OPEN_MARK */
};

/* A conntrack entry made by a direction that does not enforce (so that replies pass the
 * other, enforcing direction): the lowest bit of last_seen_ns. */
#define CM_CT_OPEN_MARK 1ULL

/* Event verdicts: what happened to the packet. */
#define CM_EVENT_ALLOWED 1
#define CM_EVENT_DENIED 2
#define CM_EVENT_AUDITED 3
/* Outlier detection: dst_ip/dport/proto name the backend, rule_id the failures counted,
 * endpoint_id the CM_EJECT_* reason. */
#define CM_EVENT_EJECTED 4
#define CM_EVENT_READMITTED 5

struct cm_event {
	__u64 time_ns;          /* bpf_ktime_get_ns */
	__u32 src_ip;           /* network order */
	__u32 dst_ip;           /* network order */
	__u32 src_identity;
	__u32 dst_identity;
	__u16 src_cluster;
	__u16 dst_cluster;
	__u16 dport;            /* network order */
	__u8 proto;
	__u8 direction;         /* CM_DIR_*, seen from the local endpoint */
	__u8 verdict;           /* CM_EVENT_* */
	__u8 pad[3];
	__u32 endpoint_id;
	__u32 rule_id;
};

#endif
