/* cgroup/sendmsg4: a DNS query sent with an address (unconnected UDP) from an
 * enrolled pod goes to the node's DNS port; the resolver it asked for is
 * recorded by socket cookie for recvmsg4. */
#include "nodemesh.h"

int nm_sendmsg4(struct bpf_sock_addr *ctx)
{
    struct nm_verdict v = {};
    if (nm_decide(ctx, NM_IPPROTO_UDP, ctx->user_ip4, (__u16)ctx->user_port, &v)) {
        ctx->user_ip4 = v.ip4;
        ctx->user_port = v.port;
    }
    return 1;
}
