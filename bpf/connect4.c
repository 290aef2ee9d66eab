/* cgroup/connect4: an enrolled pod connects to a captured destination; record
 * the original destination by socket cookie and point the socket at the node
 * proxy (TCP) or the node DNS port (UDP/53). Always allows the connect. */
#include "nodemesh.h"

int nm_connect4(struct bpf_sock_addr *ctx)
{
    struct nm_verdict v = {};
    if (nm_decide(ctx, ctx->protocol, ctx->user_ip4, (__u16)ctx->user_port, &v)) {
        ctx->user_ip4 = v.ip4;
        ctx->user_port = v.port;
    }
    return 1;
}
