/* nodemesh data path: struct and map layouts shared by every hook.
 *
 * The loader compiles all hooks as one BCC module, so every map below exists
 * once and is shared by all programs. Python mirrors these structs in
 * bpf/layout.py (checked against BCC's generated types by a test).
 *
 * Byte order: addresses and ports in maps are stored as the kernel hands them
 * to sock_addr programs, i.e. in network byte order, so the hot path compares
 * without conversions. Excluded ports are in host order (they come from users).
 *
 * Configuration comes only from -D flags, validated by bpf/config.py:
 *   NM_MAX_ENROLLED   entries of nm_enrolled (netns cookies)
 *   NM_MAX_RECORDS    entries of each original-destination LRU map
 *   NM_MAX_CIDRS      entries of the capture LPM trie
 *   NM_MAX_PORTS      entries of the excluded-ports set
 *   NM_DNS_PORT       the UDP port treated as DNS (53)
 *   NM_MAX_HOST_CG    entries of nm_host_cg (host services enrolled by cgroup)
 *
 * The peer-authentication maps (nm_peer_auth, nm_peer_stats, nm_pod_if) are
 * sized by NM_MAX_ENROLLED too: one entry per pod on the node; nm_pod_src
 * holds up to NM_PA_SRC_PER_POD addresses per pod, nm_peer_port up to
 * NM_PA_PORTS_PER_POD port modes per pod.
 */
#ifndef NODEMESH_H
#define NODEMESH_H

#if !defined(NM_MAX_ENROLLED) || !defined(NM_MAX_RECORDS) || !defined(NM_MAX_CIDRS) || \
    !defined(NM_MAX_PORTS) || !defined(NM_DNS_PORT) || !defined(NM_MAX_HOST_CG)
#error "nodemesh.h: the loader must pass every NM_* -D flag"
#endif

/* A context load at this exact point: without it the compiler may merge
 * branch-dependent loads into a computed context pointer, which the verifier
 * rejects ("dereference of modified ctx ptr"). */
#define NM_CTX(field) (*(volatile __typeof__(field) *)&(field))

#define NM_AF_INET 2
#define NM_AF_INET6 10
#define NM_IPPROTO_TCP 6
#define NM_IPPROTO_UDP 17

/* Value of nm_enrolled; key: the netns cookie (u64) of an enrolled pod. */
struct nm_target {
    __u32 proxy_ip4;  /* node proxy address */
    __u16 proxy_port; /* outbound capture port (15001) */
    __u16 dns_port;   /* node DNS port (15053); 0: DNS not redirected */
};

/* An original destination, as the app asked for it. */
struct nm_orig {
    __u32 ip4;
    __u16 port;
    __u16 host;         /* 1: from a host service; netns_cookie is then its cgroup id */
    __u64 netns_cookie; /* the pod the connection came from */
};

/* Key of nm_orig_tuple: the accepted socket as the proxy sees it. */
struct nm_tuple {
    __u32 peer_ip4;   /* pod address */
    __u32 local_ip4;  /* proxy address */
    __u16 peer_port;  /* pod's ephemeral port */
    __u16 local_port; /* proxy port (15001) */
};

/* Key of the nm_capture LPM trie. */
struct nm_cidr {
    __u32 prefixlen;
    __u32 ip4;
};

/* Counter slots of nm_counters (names in bpf/layout.py COUNTERS, same order). */
enum nm_counter {
    NM_C_CAPTURED = 0,         /* TCP connect rewritten to the proxy */
    NM_C_DNS_CAPTURED,         /* UDP/53 connect or sendmsg rewritten to the DNS port */
    NM_C_BYPASS_NOT_ENROLLED,  /* socket's netns is not enrolled */
    NM_C_BYPASS_EXCLUDED_PORT, /* destination port excluded */
    NM_C_BYPASS_NOT_CAPTURED,  /* destination outside the capture CIDRs */
    NM_C_BYPASS_PROXY,         /* destination is the proxy itself (no loops) */
    NM_C_BYPASS_OTHER,         /* loopback, other protocol, pure IPv6 */
    NM_C_RECORD_FAILED,        /* could not store the record: not captured */
    NM_C_RECORD_MOVED,         /* sock_ops moved a record to its 4-tuple */
    NM_C_RECORD_MISS,          /* established captured connection without record */
    NM_C_PEER_REWRITTEN,       /* getpeername answered with the original dst */
    NM_C_PEER_MISS,            /* getpeername on a captured socket: no record */
    NM_C_DNS_REPLY_REWRITTEN,  /* recvmsg source restored to the resolver */
    NM_C_DNS_REPLY_MISS,       /* DNS reply from the proxy without record */
    NM_C_SPOOF_DROPPED,        /* a pod sent from an address not its own: dropped (source_tc.c) */
    NM_C_PROXY_UNPROVEN,       /* opening packet from the gateway without the proxy's mark */
    NM_C_MAX,
};

BPF_HASH(nm_enrolled, __u64, struct nm_target, NM_MAX_ENROLLED);
/* Host services (bpf/hostcg.py): key: the cgroup id of a service in the host netns. */
BPF_HASH(nm_host_cg, __u64, struct nm_target, NM_MAX_HOST_CG);
BPF_LPM_TRIE(nm_capture, struct nm_cidr, __u8, NM_MAX_CIDRS);
BPF_HASH(nm_excl_ports, __u16, __u8, NM_MAX_PORTS);
BPF_TABLE("lru_hash", __u64, struct nm_orig, nm_orig_cookie, NM_MAX_RECORDS);
BPF_TABLE("lru_hash", struct nm_tuple, struct nm_orig, nm_orig_tuple, NM_MAX_RECORDS);
BPF_TABLE("lru_hash", __u64, struct nm_orig, nm_dns_cookie, NM_MAX_RECORDS);
BPF_PERCPU_ARRAY(nm_counters, __u64, NM_C_MAX);

static __always_inline void nm_count(__u32 slot)
{
    __u64 *v = nm_counters.lookup(&slot);
    if (v)
        *v += 1;
}

/* Where this task's sockets are redirected: its netns is an enrolled pod's, or
 * (not a pod) the cgroup it runs in is an enrolled host service's, exactly
 * that cgroup, not an ancestor; 0: neither. *id is the netns cookie or the
 * cgroup id, *host says which. The agent's cgroup is never in nm_host_cg. */
static __always_inline struct nm_target *nm_target_of(void *ctx, __u64 *id, __u16 *host)
{
    __u64 ns = bpf_get_netns_cookie(ctx);
    struct nm_target *t = nm_enrolled.lookup(&ns);
    *id = ns;
    *host = 0;
    if (t)
        return t;
    __u64 cg = bpf_get_current_cgroup_id();
    t = nm_host_cg.lookup(&cg);
    if (t) {
        *id = cg;
        *host = 1;
    }
    return t;
}

/* A connect/sendmsg rewrite: where to send instead. */
struct nm_verdict {
    __u32 ip4;
    __u16 port;
    __u16 pad;
};

/* The one capture decision, shared by connect4, connect6 (v4-mapped) and
 * sendmsg4. Records the original destination by socket cookie and returns 1
 * with the new destination in *v, or returns 0 (leave the socket alone). */
static __always_inline int nm_decide(void *ctx, __u32 protocol, __u32 dst_ip4, __u16 dst_port,
                                     struct nm_verdict *v)
{
    __u64 ns = 0;
    __u16 host = 0;
    struct nm_target *t = nm_target_of(ctx, &ns, &host);
    if (!t) {
        nm_count(NM_C_BYPASS_NOT_ENROLLED);
        return 0;
    }
    if ((dst_ip4 & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000)) {
        nm_count(NM_C_BYPASS_OTHER);
        return 0;
    }
    if (dst_ip4 == t->proxy_ip4) {
        nm_count(NM_C_BYPASS_PROXY);
        return 0;
    }
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct nm_orig o = {};
    o.ip4 = dst_ip4;
    o.port = dst_port;
    o.host = host;
    o.netns_cookie = ns;
    if (protocol == NM_IPPROTO_UDP) {
        if (dst_port != bpf_htons(NM_DNS_PORT) || t->dns_port == 0) {
            nm_count(NM_C_BYPASS_OTHER);
            return 0;
        }
        if (nm_dns_cookie.update(&cookie, &o) != 0) {
            nm_count(NM_C_RECORD_FAILED);
            return 0;
        }
        v->ip4 = t->proxy_ip4;
        v->port = t->dns_port;
        nm_count(NM_C_DNS_CAPTURED);
        return 1;
    }
    if (protocol != NM_IPPROTO_TCP) {
        nm_count(NM_C_BYPASS_OTHER);
        return 0;
    }
    __u16 hport = bpf_ntohs(dst_port);
    if (nm_excl_ports.lookup(&hport)) {
        nm_count(NM_C_BYPASS_EXCLUDED_PORT);
        return 0;
    }
    struct nm_cidr k = {};
    k.prefixlen = 32;
    k.ip4 = dst_ip4;
    if (!nm_capture.lookup(&k)) {
        nm_count(NM_C_BYPASS_NOT_CAPTURED);
        return 0;
    }
    if (nm_orig_cookie.update(&cookie, &o) != 0) {
        nm_count(NM_C_RECORD_FAILED);
        return 0;
    }
    v->ip4 = t->proxy_ip4;
    v->port = t->proxy_port;
    nm_count(NM_C_CAPTURED);
    return 1;
}

/* The original destination of a socket that points at the proxy, for
 * getpeername: TCP by the socket's 4-tuple, UDP (DNS) by socket cookie. */
static __always_inline struct nm_orig *nm_orig_of(void *ctx, struct bpf_sock *sk, __u32 protocol,
                                                  __u32 peer_ip4, __u16 peer_port)
{
    __u64 ns = 0;
    __u16 host = 0;
    struct nm_target *t = nm_target_of(ctx, &ns, &host);
    if (!t || peer_ip4 != t->proxy_ip4)
        return 0;
    if (protocol == NM_IPPROTO_UDP) {
        if (peer_port != t->dns_port || t->dns_port == 0)
            return 0;
        __u64 cookie = bpf_get_socket_cookie(ctx);
        return nm_dns_cookie.lookup(&cookie);
    }
    if (peer_port != t->proxy_port)
        return 0;
    struct nm_tuple k = {};
    k.peer_ip4 = sk->src_ip4;
    k.local_ip4 = peer_ip4;
    k.peer_port = bpf_htons((__u16)sk->src_port);
    k.local_port = peer_port;
    struct nm_orig *o = nm_orig_tuple.lookup(&k);
    if (!o)
        nm_count(NM_C_PEER_MISS);
    return o;
}

/* ---- peer authentication (inbound_tc.c, source_tc.c) ----------------------
 * Two tc classifiers on the *host side* of each enrolled pod's veth, in the
 * node's netns (see bpf/peerauth.py for why there):
 *   egress  (inbound_tc.c): judges what is about to enter the pod;
 *   ingress (source_tc.c):  drops what the pod sends from addresses not its own.
 * nm_pod_if maps the host-side ifindex to the pod's IPv4 address, the key of
 * nm_peer_auth and nm_peer_stats. */
#define NM_PA_OFF 0
#define NM_PA_PERMISSIVE 1
#define NM_PA_STRICT 2

#define NM_PA_UDP_ALLOW 0
#define NM_PA_UDP_DENY 1

#define NM_PA_SRC_PER_POD 8
#define NM_PA_PORTS_PER_POD 32

#define NM_TC_ACT_OK 0
#define NM_TC_ACT_SHOT 2

struct nm_peer_auth {
    __u32 mode;        /* NM_PA_* */
    __u32 allowed_ip4; /* the node proxy as the pod sees it (its gateway) */
    __u32 proxy_mark;  /* skb->mark of the proxy's sockets (SO_MARK), never 0 */
    __u16 dns_port;    /* network order: UDP from allowed_ip4 and this port is the node DNS */
    __u8 udp;          /* NM_PA_UDP_*: UDP to a STRICT pod */
    __u8 ports;        /* 1: nm_peer_port holds modes of some of this pod's ports */
    __u32 strictest;   /* with ports: the strictest of mode and the port modes, for an
                        * opening packet whose destination port cannot be read */
};

/* Key of nm_peer_port (value: a NM_PA_* mode): one port of one pod. */
struct nm_port_key {
    __u32 pod_ip4;     /* as in nm_peer_auth */
    __u16 port;        /* network order */
    __u16 pad;
};

/* Counters of connection attempts to one pod; atomic adds. */
struct nm_peer_stats {
    __u64 proxied;   /* from the node proxy (gateway address and mark): passed */
    __u64 plaintext; /* from elsewhere, PERMISSIVE: passed */
    __u64 refused;   /* from elsewhere, STRICT: dropped (UDP: per datagram) */
};

/* Value of nm_pod_if; key: ifindex of the pod's host-side veth. */
struct nm_pod_if {
    __u32 pod_ip4;     /* key of nm_peer_auth / nm_peer_stats */
};

/* Key of nm_pod_src: an address the pod behind ifindex may send from. */
struct nm_src_key {
    __u32 ifindex;
    __u32 family;      /* NM_AF_INET (addr[0..4]) or NM_AF_INET6 */
    __u8 addr[16];
};

BPF_HASH(nm_peer_auth, __u32, struct nm_peer_auth, NM_MAX_ENROLLED);
BPF_HASH(nm_peer_stats, __u32, struct nm_peer_stats, NM_MAX_ENROLLED);
BPF_HASH(nm_pod_if, __u32, struct nm_pod_if, NM_MAX_ENROLLED);
BPF_HASH(nm_pod_src, struct nm_src_key, __u8, NM_MAX_ENROLLED * NM_PA_SRC_PER_POD);
/* Not preallocated: most pods have no port modes, and the bound is large. */
BPF_F_TABLE("hash", struct nm_port_key, __u32, nm_peer_port, NM_MAX_ENROLLED * NM_PA_PORTS_PER_POD,
            BPF_F_NO_PREALLOC);

#endif /* NODEMESH_H */
