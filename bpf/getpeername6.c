/* cgroup/getpeername6: as getpeername4, for dual-stack sockets whose peer is
 * an IPv4-mapped address. */
#include "nodemesh.h"

int nm_getpeername6(struct bpf_sock_addr *ctx)
{
    if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 || ctx->user_ip6[2] != bpf_htonl(0x0000ffff))
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    struct nm_orig *o = nm_orig_of(ctx, sk, ctx->protocol, ctx->user_ip6[3], (__u16)ctx->user_port);
    if (o) {
        ctx->user_ip6[3] = o->ip4;
        ctx->user_port = o->port;
        nm_count(NM_C_PEER_REWRITTEN);
    }
    return 1;
}
