/* cgroup/recvmsg4: a reply from the node DNS port appears to come from the
 * resolver the app sent its query to. */
#include "nodemesh.h"

int nm_recvmsg4(struct bpf_sock_addr *ctx)
{
    __u64 ns = 0;
    __u16 host = 0;
    struct nm_target *t = nm_target_of(ctx, &ns, &host);
    if (!t || t->dns_port == 0)
        return 1;
    if (ctx->user_ip4 != t->proxy_ip4 || (__u16)ctx->user_port != t->dns_port)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct nm_orig *o = nm_dns_cookie.lookup(&cookie);
    if (!o) {
        nm_count(NM_C_DNS_REPLY_MISS);
        return 1;
    }
    ctx->user_ip4 = o->ip4;
    ctx->user_port = o->port;
    nm_count(NM_C_DNS_REPLY_REWRITTEN);
    return 1;
}
