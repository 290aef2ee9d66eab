/* tc ingress (direct action) on the host side of a pod's veth, in the node's
 * netns: a pod may send only from its own addresses.
 *
 * Checked: the IPv4 source, the IPv6 source (the pod's link-local fe80
 * address is one of its own: the agent lists every address of the pod's
 * interface) and the sender address of ARP packets (so a pod cannot claim
 * the gateway's IPv4 address in the ARP caches of its neighbours). The
 * unspecified source (0.0.0.0, ::) passes: DHCP discovery, IPv6 duplicate
 * address detection and MLD use it, and it impersonates nobody. Other
 * ethertypes and VLAN-tagged frames are dropped: the node has no use for
 * them and they would carry addresses this program does not read.
 *
 * Only interfaces in nm_pod_if are checked. A drop is counted in
 * nm_counters (spoof_dropped). Addresses the pod gains after the agent last
 * read them are dropped until the agent's next pass (start, each snapshot,
 * reload). */
#include "nodemesh.h"

#define NM_SRC_ETH_HLEN 14

int nm_source_tc(struct __sk_buff *skb)
{
    __u32 ifindex = skb->ifindex;
    if (!nm_pod_if.lookup(&ifindex))
        return NM_TC_ACT_OK;
    struct nm_src_key k = {};
    k.ifindex = ifindex;
    __u32 off = 0, len = 0;
    if (skb->vlan_present) {
        nm_count(NM_C_SPOOF_DROPPED);
        return NM_TC_ACT_SHOT;
    }
    if (skb->protocol == bpf_htons(0x0806)) { /* ARP for IPv4 over Ethernet: sender IP */
        k.family = NM_AF_INET;
        off = NM_SRC_ETH_HLEN + 14;
        len = 4;
    } else if (skb->protocol == bpf_htons(0x0800)) {
        k.family = NM_AF_INET;
        off = NM_SRC_ETH_HLEN + 12;
        len = 4;
    } else if (skb->protocol == bpf_htons(0x86DD)) {
        k.family = NM_AF_INET6;
        off = NM_SRC_ETH_HLEN + 8;
        len = 16;
    } else {
        nm_count(NM_C_SPOOF_DROPPED);
        return NM_TC_ACT_SHOT;
    }
    int loaded = len == 4 ? bpf_skb_load_bytes(skb, off, k.addr, 4)
                          : bpf_skb_load_bytes(skb, off, k.addr, 16);
    if (loaded != 0) {
        nm_count(NM_C_SPOOF_DROPPED); /* too short to carry its own source */
        return NM_TC_ACT_SHOT;
    }
    __u64 lo, hi;
    __builtin_memcpy(&lo, &k.addr[0], 8);
    __builtin_memcpy(&hi, &k.addr[8], 8);
    if (lo == 0 && hi == 0)
        return NM_TC_ACT_OK; /* unspecified: DHCP, DAD, MLD */
    if (nm_pod_src.lookup(&k))
        return NM_TC_ACT_OK;
    nm_count(NM_C_SPOOF_DROPPED);
    return NM_TC_ACT_SHOT;
}
