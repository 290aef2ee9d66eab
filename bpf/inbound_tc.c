/* tc ingress (direct action) on a pod's interface, inside the pod's netns:
 * peer authentication for connections *to* the pod.
 *
 * Only connection-opening TCP packets (SYN without ACK) to a pod with a
 * policy in nm_peer_auth are looked at; everything else (established
 * traffic, UDP, ARP, IPv6, non-first fragments) passes untouched, so
 * switching modes never cuts a connection that is already open. A SYN from
 * the node proxy's address passes (proxied); from anywhere else it passes in
 * PERMISSIVE (plaintext) and is dropped in STRICT (refused). The pod's
 * loopback traffic never crosses this interface.
 *
 * Assumes an Ethernet interface (veth): the IPv4 header starts at byte 14. */
#include "nodemesh.h"

#define NM_ETH_HLEN 14
#define NM_TCP_SYN 0x02
#define NM_TCP_ACK 0x10

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

int nm_inbound_tc(struct __sk_buff *skb)
{
    if (skb->protocol != bpf_htons(0x0800))
        return NM_TC_ACT_OK;
    __u8 iph[20];
    if (bpf_skb_load_bytes(skb, NM_ETH_HLEN, iph, sizeof(iph)) != 0)
        return NM_TC_ACT_OK;
    if ((iph[0] >> 4) != 4 || iph[9] != NM_IPPROTO_TCP)
        return NM_TC_ACT_OK;
    if (((((__u32)iph[6] << 8) | iph[7]) & 0x1fff) != 0)
        return NM_TC_ACT_OK; /* non-first fragment: no TCP header, useless alone */
    __u32 ihl = (__u32)(iph[0] & 0x0f) * 4;
    if (ihl < 20)
        return NM_TC_ACT_OK; /* malformed: the IP layer drops it */
    __u32 saddr, daddr;
    __builtin_memcpy(&saddr, &iph[12], 4);
    __builtin_memcpy(&daddr, &iph[16], 4);

    struct nm_peer_auth *pa = nm_peer_auth.lookup(&daddr);
    if (!pa)
        return NM_TC_ACT_OK;
    __u32 mode = pa->mode, allowed = pa->allowed_ip4;
    if (mode != NM_PA_PERMISSIVE && mode != NM_PA_STRICT)
        return NM_TC_ACT_OK;

    __u8 flags = 0;
    if (bpf_skb_load_bytes(skb, NM_ETH_HLEN + ihl + 13, &flags, 1) == 0) {
        if ((flags & (NM_TCP_SYN | NM_TCP_ACK)) != NM_TCP_SYN)
            return NM_TC_ACT_OK;
    }
    /* else: a first fragment too short to show the flags; judged like a SYN */

    if (saddr == allowed) {
        nm_pa_count(daddr, NM_PA_PROXIED);
        return NM_TC_ACT_OK;
    }
    if (mode == NM_PA_STRICT) {
        nm_pa_count(daddr, NM_PA_REFUSED);
        return NM_TC_ACT_SHOT;
    }
    nm_pa_count(daddr, NM_PA_PLAINTEXT);
    return NM_TC_ACT_OK;
}
