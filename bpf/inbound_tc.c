/* tc egress (direct action) on the host side of a pod's veth, in the node's
 * netns: peer authentication for traffic *to* the pod.
 *
 * Everything that enters the pod from outside crosses this hook: the node
 * proxy, other pods on the bridge, other nodes, the node itself, over IPv4
 * and IPv6 (link-local included). Only the pod's own loopback does not.
 *
 * Judged ("opening" packets): TCP SYN without ACK (a first fragment too
 * short to show the flags counts as one; a non-first fragment is useless
 * alone and passes), IPv6 whose extension-header chain is too long to
 * follow, and, for a STRICT pod with udp = deny, every UDP datagram.
 * Everything else (established TCP, ARP, ICMP/ICMPv6 and so neighbour
 * discovery) passes, so switching modes never cuts an open connection.
 *
 * The node proxy is recognised by two facts: the IPv4 source is the pod's
 * gateway (allowed_ip4) AND skb->mark is the proxy's mark. The agent sets
 * that mark with SO_MARK on its pod-facing sockets (which needs
 * CAP_NET_ADMIN); the mark is still there at this hook because the packet
 * has not yet left the node's netns (veth clears skb->mark when it hands
 * the packet to the pod's netns: skb_scrub_packet with xnet). A plain
 * process in the node's netns can bind the gateway address but cannot set
 * the mark, and a pod cannot bring a mark across its own veth; either is
 * counted as proxy_unproven and judged like any other peer. A root process
 * with CAP_NET_ADMIN in the node's netns can set any mark: it is trusted as
 * it is for every other network setting of the node.
 *
 * The mode is the pod's (nm_peer_auth), or, for a pod with port modes
 * (PeerAuthentication portLevelMtls: ports != 0), the one nm_peer_port holds
 * for the packet's destination port; a packet whose port cannot be read is
 * judged by the pod's strictest mode. A pod without port modes costs no
 * second lookup.
 *
 * Verdicts: from the proxy -> pass (proxied); else PERMISSIVE -> pass
 * (plaintext), STRICT -> drop (refused). UDP: only a STRICT pod with
 * udp = deny is judged, and replies of the node DNS proxy (gateway, DNS
 * port) pass uncounted. The proxy dials pods over IPv4 only, so in STRICT
 * no IPv6 connection is ever "proxied".
 *
 * Assumes an Ethernet interface (veth): the IP header starts at byte 14. */
#include "nodemesh.h"

#define NM_ETH_HLEN 14
#define NM_TCP_SYN 0x02
#define NM_TCP_ACK 0x10
#define NM_V6_EXT_MAX 6 /* extension headers followed before giving up */

enum nm_pa_counter { NM_PA_PROXIED, NM_PA_PLAINTEXT, NM_PA_REFUSED };

static __always_inline void nm_pa_count(__u32 pod_ip4, int which)
{
    struct nm_peer_stats *s = nm_peer_stats.lookup(&pod_ip4);
    if (!s) {
        struct nm_peer_stats zero = {};
        nm_peer_stats.insert(&pod_ip4, &zero); /* another CPU may have won: fine */
        s = nm_peer_stats.lookup(&pod_ip4);
        if (!s)
            return; /* map full: the verdict stands, uncounted */
    }
    if (which == NM_PA_PROXIED)
        __sync_fetch_and_add(&s->proxied, 1);
    else if (which == NM_PA_PLAINTEXT)
        __sync_fetch_and_add(&s->plaintext, 1);
    else
        __sync_fetch_and_add(&s->refused, 1);
}

/* What the verdict needs from one packet. */
struct nm_pkt {
    __u32 saddr4;   /* IPv4 only */
    __u32 l4_off;   /* offset of the TCP/UDP header */
    __u8 proto;     /* final L4 protocol; 0xff: IPv6 chain not followed */
    __u8 is_v4;
    __u8 later;     /* a non-first fragment */
};

/* 0: parsed; -1: not IP or malformed (passed: the IP layer judges it). */
static __always_inline int nm_parse(struct __sk_buff *skb, struct nm_pkt *p)
{
    if (skb->protocol == bpf_htons(0x0800)) {
        __u8 iph[20];
        if (bpf_skb_load_bytes(skb, NM_ETH_HLEN, iph, sizeof(iph)) != 0)
            return -1;
        __u32 ihl = (__u32)(iph[0] & 0x0f) * 4;
        if ((iph[0] >> 4) != 4 || ihl < 20)
            return -1;
        p->is_v4 = 1;
        p->proto = iph[9];
        p->later = ((((__u32)iph[6] << 8) | iph[7]) & 0x1fff) != 0;
        p->l4_off = NM_ETH_HLEN + ihl;
        __builtin_memcpy(&p->saddr4, &iph[12], 4);
        return 0;
    }
    if (skb->protocol != bpf_htons(0x86DD))
        return -1;
    __u8 nh = 0;
    if (bpf_skb_load_bytes(skb, NM_ETH_HLEN + 6, &nh, 1) != 0)
        return -1;
    __u32 off = NM_ETH_HLEN + 40;
#pragma unroll
    for (int i = 0; i < NM_V6_EXT_MAX; i++) {
        __u8 ext[4];
        if (nh != 0 && nh != 43 && nh != 60 && nh != 44 && nh != 51)
            break; /* hop-by-hop, routing, destination options, fragment, AH */
        if (bpf_skb_load_bytes(skb, off, ext, sizeof(ext)) != 0) {
            p->proto = 0xff;
            return 0;
        }
        if (nh == 44) {
            if (((((__u32)ext[2] << 8) | ext[3]) & 0xfff8) != 0)
                p->later = 1;
            off += 8;
        } else if (nh == 51) {
            off += ((__u32)ext[1] + 2) * 4;
        } else {
            off += ((__u32)ext[1] + 1) * 8;
        }
        nh = ext[0];
    }
    if (nh == 0 || nh == 43 || nh == 60 || nh == 44 || nh == 51)
        nh = 0xff; /* still inside the chain: cannot tell what it carries */
    p->proto = nh;
    p->l4_off = off;
    return 0;
}

int nm_inbound_tc(struct __sk_buff *skb)
{
    __u32 ifindex = skb->ifindex;
    struct nm_pod_if *pif = nm_pod_if.lookup(&ifindex);
    if (!pif)
        return NM_TC_ACT_OK; /* not the veth of a pod we know */
    __u32 pod = pif->pod_ip4;
    struct nm_peer_auth *pa = nm_peer_auth.lookup(&pod);
    if (!pa)
        return NM_TC_ACT_OK;
    __u32 mode = pa->mode;
    if (!pa->ports && mode != NM_PA_PERMISSIVE && mode != NM_PA_STRICT)
        return NM_TC_ACT_OK;

    struct nm_pkt p = {};
    if (nm_parse(skb, &p) != 0 || p.later)
        return NM_TC_ACT_OK;
    if (p.proto == NM_IPPROTO_TCP) {
        __u8 flags = 0;
        if (bpf_skb_load_bytes(skb, p.l4_off + 13, &flags, 1) == 0 &&
            (flags & (NM_TCP_SYN | NM_TCP_ACK)) != NM_TCP_SYN)
            return NM_TC_ACT_OK; /* not connection-opening */
        /* else a SYN, or a first fragment too short to show the flags */
    } else if (p.proto != NM_IPPROTO_UDP && p.proto != 0xff) {
        return NM_TC_ACT_OK; /* ICMP, ICMPv6 (neighbour discovery), ... */
    }
    if (pa->ports) {
        struct nm_port_key k = {};
        k.pod_ip4 = pod;
        if (p.proto != 0xff && bpf_skb_load_bytes(skb, p.l4_off + 2, &k.port, 2) == 0) {
            __u32 *pm = nm_peer_port.lookup(&k);
            if (pm)
                mode = *pm;
        } else {
            mode = pa->strictest; /* the port is unknown: no port's mode may be bypassed */
        }
    }
    int udp = 0;
    if (p.proto == NM_IPPROTO_UDP) {
        if (mode != NM_PA_STRICT || pa->udp != NM_PA_UDP_DENY)
            return NM_TC_ACT_OK; /* UDP is left alone (the default, as Istio does) */
        udp = 1;
    } else if (mode != NM_PA_PERMISSIVE && mode != NM_PA_STRICT) {
        return NM_TC_ACT_OK;
    }

    if (p.is_v4 && p.saddr4 == pa->allowed_ip4) {
        if (udp) {
            __u16 sport = 0;
            if (bpf_skb_load_bytes(skb, p.l4_off, &sport, 2) == 0 && sport == pa->dns_port &&
                pa->dns_port != 0)
                return NM_TC_ACT_OK; /* the node DNS proxy's answer */
        }
        if (skb->mark == pa->proxy_mark && pa->proxy_mark != 0) {
            if (!udp)
                nm_pa_count(pod, NM_PA_PROXIED);
            return NM_TC_ACT_OK;
        }
        nm_count(NM_C_PROXY_UNPROVEN); /* the gateway address, but not the proxy */
    }
    if (mode == NM_PA_STRICT) {
        nm_pa_count(pod, NM_PA_REFUSED);
        return NM_TC_ACT_SHOT;
    }
    nm_pa_count(pod, NM_PA_PLAINTEXT);
    return NM_TC_ACT_OK;
}
