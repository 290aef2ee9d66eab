/* sock_ops: when a captured connection is established (client side, in the
 * pod), move its record from the socket-cookie key to the 4-tuple key
 * (pod ip:port, proxy ip:port) that the proxy can compute from its accepted
 * socket. getpeername4/6 read the same 4-tuple record. */
#include "nodemesh.h"

int nm_sockops(struct bpf_sock_ops *skops)
{
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        return 1;
    /* Read every field first: branch-dependent context loads get merged by
     * the compiler into a computed pointer, which the verifier rejects. */
    __u32 family = skops->family;
    __u32 local_ip4 = NM_CTX(skops->local_ip4);
    __u32 remote_ip4 = NM_CTX(skops->remote_ip4);
    __u32 local6_3 = NM_CTX(skops->local_ip6[3]);
    __u32 r6_0 = NM_CTX(skops->remote_ip6[0]), r6_1 = NM_CTX(skops->remote_ip6[1]);
    __u32 r6_2 = NM_CTX(skops->remote_ip6[2]), r6_3 = NM_CTX(skops->remote_ip6[3]);
    if (family == NM_AF_INET6) {
        if (r6_0 != 0 || r6_1 != 0 || r6_2 != bpf_htonl(0x0000ffff))
            return 1;
        local_ip4 = local6_3;
        remote_ip4 = r6_3;
    } else if (family != NM_AF_INET) {
        return 1;
    }
    /* remote_port is network order; little-endian kernels shift it into the
     * upper half of the u32 (historic ABI), others leave it in the lower. */
    __u32 rp = NM_CTX(skops->remote_port);
    __u32 lp = NM_CTX(skops->local_port);
    __u16 remote_port = (rp >> 16) ? (__u16)(rp >> 16) : (__u16)rp;
    __u16 local_port = bpf_htons((__u16)lp);

    __u64 cookie = bpf_get_socket_cookie(skops);
    struct nm_orig *o = nm_orig_cookie.lookup(&cookie);
    if (!o) {
        __u64 ns = bpf_get_netns_cookie(skops);
        struct nm_target *t = nm_enrolled.lookup(&ns);
        if (t && remote_ip4 == t->proxy_ip4 && remote_port == t->proxy_port)
            nm_count(NM_C_RECORD_MISS);
        return 1;
    }
    struct nm_orig copy = *o;
    struct nm_tuple k = {};
    k.peer_ip4 = local_ip4;
    k.local_ip4 = remote_ip4;
    k.peer_port = local_port;
    k.local_port = remote_port;
    if (nm_orig_tuple.update(&k, &copy) != 0) {
        nm_count(NM_C_RECORD_FAILED);
        return 1;
    }
    nm_orig_cookie.delete(&cookie);
    nm_count(NM_C_RECORD_MOVED);
    return 1;
}
