/* cgroup/connect6: IPv4-mapped destinations (::ffff:a.b.c.d) of dual-stack
 * sockets get the same decision as connect4; pure IPv6 is not captured yet. */
#include "nodemesh.h"

static __always_inline int nm_is_v4mapped(__u32 w0, __u32 w1, __u32 w2)
{
    return w0 == 0 && w1 == 0 && w2 == bpf_htonl(0x0000ffff);
}

int nm_connect6(struct bpf_sock_addr *ctx)
{
    struct nm_verdict v = {};
    if (!nm_is_v4mapped(ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2])) {
        nm_count(NM_C_BYPASS_OTHER);
        return 1;
    }
    if (nm_decide(ctx, ctx->protocol, ctx->user_ip6[3], (__u16)ctx->user_port, &v)) {
        ctx->user_ip6[3] = v.ip4;
        ctx->user_port = v.port;
    }
    return 1;
}
