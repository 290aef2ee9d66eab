/* cgroup/getpeername4: a captured socket reports the destination the app
 * asked for, not the proxy. */
#include "nodemesh.h"

int nm_getpeername4(struct bpf_sock_addr *ctx)
{
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    struct nm_orig *o = nm_orig_of(ctx, sk, ctx->protocol, ctx->user_ip4, (__u16)ctx->user_port);
    if (o) {
        ctx->user_ip4 = o->ip4;
        ctx->user_port = o->port;
        nm_count(NM_C_PEER_REWRITTEN);
    }
    return 1;
}
