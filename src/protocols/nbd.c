/*
 * nbd.c - the "nbd" client protocol (vd_drv_nbd): a protocol node on an NBD server's export,
 * spoken through libnbd (never a hand-written client).
 *
 * Promises: every byte moves through libnbd; requests larger than the server's maximum block size
 * (or 32 MiB) are split, and requests not aligned to its minimum block size are widened with a
 * read-modify-write, so any byte range works on any server. Reads past the export's end return
 * zeroes (formats read partial last clusters); writes past it fail -ENOSPC (an export cannot
 * grow). A read-only export makes a read-only node (-EPERM).
 * Unaligned writes take rmw_lock exclusively (aligned ones shared), so a read-modify-write never
 * writes stale bytes back over a concurrent write. The connections, their threads and what
 * happens when a link is lost: nbd-connection.c.
 */
#include <errno.h>
#include <jansson.h>
#include <libnbd.h>
#include <netdb.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "block/block.h"
#include "protocols/nbd.h"
#include "protocols/nbd-connection.h"
#include "util/log.h"
#include "util/lock.h"
#include "util/tls-creds.h"

static NbdState *ns_of(BlockNode *bs)
{
    return bs->opaque;
}

/* ---- URIs ---- */

static bool uri_unreserved(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '-' || c == '.' || c == '_' || c == '~';
}

/* Append s percent-encoded (keep_slash: '/' stays literal, for socket paths). */
static char *pct_append(char *out, const char *s, bool keep_slash)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (uri_unreserved(*p) || (keep_slash && *p == '/')) {
            *out++ = (char)*p;
        } else {
            out += sprintf(out, "%%%02X", *p);
        }
    }
    *out = '\0';
    return out;
}

char *vd_nbd_make_uri(const char *host, const char *port, const char *unix_path,
                      const char *export_name)
{
    bool has_host = host && *host;
    bool has_unix = unix_path && *unix_path;
    if (has_host == has_unix) {
        errno = EINVAL;
        return NULL;
    }
    if (!export_name) {
        export_name = "";
    }
    if (!port || !*port) {
        port = VD_NBD_DEFAULT_PORT;
    }
    for (const char *p = port; *p; p++) {
        if (*p < '0' || *p > '9') {
            errno = EINVAL;
            return NULL;
        }
    }
    /* Worst case every byte becomes %XX. */
    size_t cap = 64 + 3 * strlen(export_name) + (has_host ? 3 * strlen(host) + strlen(port)
                                                          : 3 * strlen(unix_path));
    char *uri = malloc(cap);
    if (!uri) {
        errno = ENOMEM;
        return NULL;
    }
    char *o = uri;
    if (has_host) {
        bool v6 = strchr(host, ':') != NULL && host[0] != '[';
        o += sprintf(o, "nbd://%s", v6 ? "[" : "");
        if (v6) {
            o += sprintf(o, "%s]", host); /* an IPv6 literal: hex digits and colons */
        } else {
            o = pct_append(o, host, false);
        }
        o += sprintf(o, ":%s/", port);
        o = pct_append(o, export_name, false);
    } else {
        o += sprintf(o, "nbd+unix:///");
        o = pct_append(o, export_name, false);
        o += sprintf(o, "?socket=");
        o = pct_append(o, unix_path, true);
    }
    return uri;
}

/*
 * The name QEMU gives an nbd node (nbd_refresh_filename): "nbd://HOST:PORT[/EXPORT]" or
 * "nbd+unix://[/EXPORT]?socket=PATH" (no "/" when the export name is empty). NULL keeps the
 * URI as given: nbds://, vsock, an IPv6 literal, other parameters, or any %-escape (QEMU's
 * name would be the decoded text, no longer a URI that opens the same export).
 */
static char *qemu_node_name(const char *uri)
{
    bool is_unix = !strncmp(uri, "nbd+unix://", 11);
    const char *p = is_unix ? uri + 11 : !strncmp(uri, "nbd://", 6) ? uri + 6 : NULL;
    if (!p || strpbrk(p, "%[#")) {
        return NULL;
    }
    size_t auth = strcspn(p, "/?");
    const char *path = p + auth;
    size_t plen = strcspn(path, "?");
    const char *query = path[plen] == '?' ? path + plen + 1 : NULL;
    const char *exp = plen > 1 ? path + 1 : "";
    int elen = plen > 1 ? (int)plen - 1 : 0;
    char *out = NULL;
    int r;
    if (is_unix) {
        if (auth || !query || strncmp(query, "socket=", 7) || !query[7] || strchr(query, '&')) {
            return NULL;
        }
        r = elen ? asprintf(&out, "nbd+unix:///%.*s?socket=%s", elen, exp, query + 7)
                 : asprintf(&out, "nbd+unix://?socket=%s", query + 7);
    } else {
        const char *colon = memchr(p, ':', auth);
        int hlen = colon ? (int)(colon - p) : (int)auth;
        const char *port = colon ? colon + 1 : VD_NBD_DEFAULT_PORT;
        int portlen = colon ? (int)(auth - (size_t)hlen - 1) : (int)strlen(port);
        if (query || hlen == 0 || portlen == 0) {
            return NULL;
        }
        r = elen ? asprintf(&out, "nbd://%.*s:%.*s/%.*s", hlen, p, portlen, port, elen, exp)
                 : asprintf(&out, "nbd://%.*s:%.*s", hlen, p, portlen, port);
    }
    return r < 0 ? NULL : out;
}

/*
 * Would QEMU's nbd_parse_uri take this nbd:// or nbd+unix:// URI (vdisk's own parameters taken
 * out)? nbd:// needs a host and no query; nbd+unix:// no host or port and exactly one query
 * parameter, socket. Other schemes (nbds://, vsock) are vdisk's and libnbd's to check.
 */
static bool qemu_uri_valid(const char *uri)
{
    bool is_unix = !strncmp(uri, "nbd+unix://", 11);
    const char *p = is_unix ? uri + 11 : !strncmp(uri, "nbd://", 6) ? uri + 6 : NULL;
    if (!p) {
        return true;
    }
    size_t auth = strcspn(p, "/?#");
    const char *query = strchr(p, '?');
    if (is_unix) {
        return auth == 0 && query && !strncmp(query + 1, "socket=", 7) && !strchr(query, '&');
    }
    size_t host = p[0] == '[' ? auth : strcspn(p, ":/?#");
    return host > 0 && !query;
}

/* ---- connecting ---- */

static int first_connect_timeout_ms = -1; /* vd_nbd_set_connect_timeout */

void vd_nbd_set_connect_timeout(int timeout_ms)
{
    __atomic_store_n(&first_connect_timeout_ms, timeout_ms < 0 ? -1 : timeout_ms,
                     __ATOMIC_RELAXED);
}

/*
 * vdisk's own URI query parameters (seconds; the blockdev-add options of the same names become
 * these): "reconnect-delay", "open-timeout", "x-stall-timeout". They are taken out of the URI
 * (into s) and the rest, libnbd's, stays in s->uri.
 */
static const struct {
    const char *key;
    size_t at;
} nbd_uri_opts[] = {
    {"reconnect-delay", offsetof(NbdState, reconnect_ms)},
    {"open-timeout", offsetof(NbdState, open_timeout_ms)},
    {"x-stall-timeout", offsetof(NbdState, stall_ms)},
};

/* A string one: the TCP congestion control of the node's connections (conn_set_congestion). */
#define NBD_URI_CC "x-tcp-congestion"

static int uri_take_options(NbdState *s, const char *in, VdError **errp)
{
    s->stall_ms = NBD_STALL_DEFAULT_S * 1000;
    s->uri = strdup(in);
    if (!s->uri) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    char *q = strchr(s->uri, '?');
    if (!q) {
        return 0;
    }
    char *out = q; /* kept parameters are copied down over the taken ones */
    char *p = q + 1;
    while (*p) {
        size_t n = strcspn(p, "&");
        char save = p[n];
        p[n] = '\0';
        bool taken = false;
        if (!strncmp(p, NBD_URI_CC "=", strlen(NBD_URI_CC) + 1)) {
            const char *v = p + strlen(NBD_URI_CC) + 1;
            /* A kernel name (TCP_CA_NAME_MAX 16): letters, digits, '_' (reno, cubic, bbr...). */
            if (!*v || strlen(v) >= 16 || strspn(v, "abcdefghijklmnopqrstuvwxyz0123456789_") !=
                                              strlen(v)) {
                vd_error_setg(errp, EINVAL, "NBD URI parameter '%s': expected the name of a TCP "
                              "congestion control algorithm, got '%s'", NBD_URI_CC, v);
                return -EINVAL;
            }
            free(s->tcp_cc);
            s->tcp_cc = strdup(v);
            if (!s->tcp_cc) {
                vd_error_setg(errp, ENOMEM, "Out of memory");
                return -ENOMEM;
            }
            taken = true;
        }
        for (size_t i = 0; i < sizeof(nbd_uri_opts) / sizeof(nbd_uri_opts[0]); i++) {
            size_t kl = strlen(nbd_uri_opts[i].key);
            if (strncmp(p, nbd_uri_opts[i].key, kl) || p[kl] != '=') {
                continue;
            }
            char *end;
            errno = 0;
            unsigned long v = strtoul(p + kl + 1, &end, 10);
            if (!p[kl + 1] || *end || errno || v > 86400 * 365) {
                vd_error_setg(errp, EINVAL, "NBD URI parameter '%s': expected seconds, got "
                              "'%s'", nbd_uri_opts[i].key, p + kl + 1);
                return -EINVAL;
            }
            *(int64_t *)((char *)s + nbd_uri_opts[i].at) = (int64_t)v * 1000;
            taken = true;
        }
        if (!taken) {
            *out = out == q ? '?' : '&';
            out++;
            memmove(out, p, n + 1);
            out += n;
        }
        p += n + (save ? 1 : 0);
    }
    *out = '\0';
    return 0;
}

/*
 * The first connection: tried once (timeout_ms: vdiskd --nbd-connect-timeout, -1 blocks), or,
 * with open-timeout, again and again until that has passed (QEMU's open-timeout).
 */
static struct nbd_handle *first_conn_open(NbdState *s, int *perr, VdError **errp)
{
    int timeout_ms = __atomic_load_n(&first_connect_timeout_ms, __ATOMIC_RELAXED);
    int64_t deadline = nbdc_now_ms() + s->open_timeout_ms;
    for (unsigned tries = 1;; tries++) {
        int64_t left = deadline - nbdc_now_ms();
        int t = timeout_ms;
        if (s->open_timeout_ms > 0 && (t < 0 || t > left)) {
            t = left > 0 ? (int)left : 1;
        }
        VdError *local = NULL;
        struct nbd_handle *h = nbdc_conn_open(s, t, perr, &local);
        if (h || s->open_timeout_ms <= 0 || deadline - nbdc_now_ms() <= 0 || tries >= 100000) {
            vd_error_propagate(errp, local);
            return h;
        }
        vd_error_free(local);
        struct timespec pause = {.tv_nsec = 200 * 1000000L};
        nanosleep(&pause, NULL);
    }
}

static int nbd_drv_open_conns(BlockNode *bs, const VdOpenOptions *opts, VdError **errp);

static int nbd_drv_open(BlockNode *bs, const VdOpenOptions *opts, VdError **errp)
{
    NbdState *s = ns_of(bs);
    memset(s, 0, sizeof(*s));
    s->bs = bs;
    if (!opts->filename || !*opts->filename) {
        vd_error_setg(errp, EINVAL, "The 'nbd' protocol needs a URI (nbd://HOST[:PORT]/EXPORT "
                      "or nbd+unix:///EXPORT?socket=PATH)");
        return -EINVAL;
    }
    if (opts->tls_creds && !(s->tls = vd_tls_creds_get(opts->tls_creds, false, errp))) {
        return -EINVAL;
    }
    int r = 0;
    /*
     * libnbd 1.14 checks a server's certificate only against a host name, which a unix socket
     * has not: it would accept any certificate there. QEMU checks the chain; refuse rather than
     * connect unauthenticated (PSK authenticates both ends by itself).
     */
    if (s->tls && !vd_tls_creds_is_psk(s->tls) && vd_tls_creds_verify_peer(s->tls) &&
        opts->filename && !strncmp(opts->filename, "nbds+unix:", 10)) {
        vd_error_setg(errp, ENOTSUP, "x509 TLS over a unix socket is not supported by vdiskd: "
                      "libnbd 1.14 does not verify the server's certificate there (use TCP, "
                      "tls-creds-psk, or verify-peer=off on '%s' to accept any server)",
                      opts->tls_creds);
        r = -ENOTSUP;
    }
    if (r == 0) {
        r = uri_take_options(s, opts->filename, errp);
    }
    if (r == 0 && !strncmp(s->uri, "nbd+tcp://", 10)) {
        /* QEMU's other spelling of nbd://; libnbd knows only that one */
        memmove(s->uri + 3, s->uri + 7, strlen(s->uri + 7) + 1);
    }
    if (r == 0 && !qemu_uri_valid(s->uri)) {
        vd_error_setg(errp, EINVAL, "No valid URL specified"); /* QEMU's words for all of it */
        r = -EINVAL;
    }
    if (r == 0) {
        r = nbd_drv_open_conns(bs, opts, errp);
    }
    char *name = r == 0 ? qemu_node_name(s->uri) : NULL;
    /* an export given as "" (options, not a URI): QEMU's name keeps the path's "/" */
    const char *exp = opts->options ? vd_options_str(opts->options, "export") : NULL;
    if (name && exp && !*exp) {
        char *slashed = NULL;
        size_t at = strcspn(name, "?"); /* nbd://H:P, nbd+unix://?socket=S */
        if (asprintf(&slashed, "%.*s/%s", (int)at, name, name + at) >= 0) {
            free(name);
            name = slashed;
        }
    }
    if (name) {
        free(bs->filename);
        bs->filename = name;
    }
    if (r < 0) {
        vd_tls_creds_unref(s->tls);
        s->tls = NULL;
        free(s->uri);
        s->uri = NULL;
        free(s->tcp_cc);
        s->tcp_cc = NULL;
    }
    return r;
}

static int nbd_drv_open_conns(BlockNode *bs, const VdOpenOptions *opts, VdError **errp)
{
    NbdState *s = ns_of(bs);
    const char *uri = s->uri;
    int cerr = 0;
    struct nbd_handle *h = first_conn_open(s, &cerr, errp);
    if (!h) {
        return -cerr;
    }
    int64_t size = nbd_get_size(h);
    if (size < 0) {
        int err = nbdc_ret();
        vd_error_setg(errp, -err, "Could not open '%s': could not get the export size: %s", uri,
                      nbdc_msg());
        nbdc_conn_close(h);
        return err;
    }
    s->size = (uint64_t)size;
    nbdc_identity_of(h, &s->id);
    s->export_read_only = nbd_is_read_only(h) == 1;
    s->read_only = s->export_read_only || !(opts->flags & VD_OPEN_RDWR);
    s->can_flush = nbd_can_flush(h) == 1;
    s->can_fua = nbd_can_fua(h) == 1;
    s->can_trim = nbd_can_trim(h) == 1;
    s->can_zero = nbd_can_zero(h) == 1;
    s->can_fast_zero = nbd_can_fast_zero(h) == 1;
    s->multi_conn = nbd_can_multi_conn(h) == 1;
    bool extra_conns = s->multi_conn && !nbdc_conn_is_tcp(h);
    s->has_base_alloc = nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;

    int64_t minb = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
    int64_t maxb = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
    s->align = 1;
    if (minb > 1 && minb <= 65536 && (minb & (minb - 1)) == 0) {
        s->align = (uint32_t)minb;
    }
    s->max_io = NBD_IO_MAX;
    if (maxb > 0 && (uint64_t)maxb < s->max_io) {
        s->max_io = (uint32_t)maxb;
    }
    s->max_io -= s->max_io % s->align;
    if (s->max_io == 0) {
        s->max_io = s->align;
    }
    if (pthread_rwlock_init(&s->rmw_lock, NULL) != 0) {
        vd_error_setg(errp, ENOMEM, "Could not open '%s': out of resources", uri);
        nbdc_identity_free(&s->id);
        nbdc_conn_close(h);
        return -ENOMEM;
    }
    if (pthread_mutex_init(&s->fence_lock, NULL) != 0) {
        vd_error_setg(errp, ENOMEM, "Could not open '%s': out of resources", uri);
        pthread_rwlock_destroy(&s->rmw_lock);
        nbdc_identity_free(&s->id);
        nbdc_conn_close(h);
        return -ENOMEM;
    }
    s->lock_init = true;
    int r = nbdc_conn_start(s, &s->conn[0], h);
    if (r < 0) {
        vd_error_setg(errp, -r, "Could not open '%s': %s", uri, strerror(-r));
        pthread_rwlock_destroy(&s->rmw_lock);
        pthread_mutex_destroy(&s->fence_lock);
        nbdc_identity_free(&s->id);
        s->lock_init = false;
        return r;
    }
    s->nconns = 1;

    if (extra_conns) {
        for (int i = 1; i < NBD_MAX_CONNS; i++) {
            VdError *local = NULL;
            struct nbd_handle *x = nbdc_conn_open(s, NBD_EXTRA_CONNECT_MS, &cerr, &local);
            if (!x) {
                vd_log(VD_LOG_DEBUG, "nbd: using %d connection(s) to '%s': %s", s->nconns, uri,
                       vd_error_msg(local));
                vd_error_free(local);
                break;
            }
            /* The same export must answer; anything else is not a usable extra connection. */
            if (nbdc_conn_other_export(s, x)) {
                nbdc_conn_close(x);
                break;
            }
            if (nbdc_conn_start(s, &s->conn[s->nconns], x) < 0) {
                break;
            }
            s->nconns++;
        }
    }
    bs->read_only = s->read_only;
    return 0;
}

static void nbd_drv_close(BlockNode *bs)
{
    NbdState *s = ns_of(bs);
    for (int i = 0; i < s->nconns; i++) {
        nbdc_conn_stop(&s->conn[i]);
    }
    s->nconns = 0;
    if (s->lock_init) {
        pthread_rwlock_destroy(&s->rmw_lock);
        pthread_mutex_destroy(&s->fence_lock);
        nbdc_identity_free(&s->id);
        s->lock_init = false;
    }
    vd_tls_creds_unref(s->tls);
    s->tls = NULL;
    free(s->uri);
    s->uri = NULL;
    free(s->tcp_cc);
    s->tcp_cc = NULL;
}

int vd_nbd_connection_count(BlockNode *bs)
{
    if (!bs || bs->drv != &vd_drv_nbd) {
        return 0;
    }
    return ns_of(bs)->nconns;
}

/* ---- I/O ---- */

/* Read [off, off+len) where off is aligned and len is aligned or reaches the export's end. */
static int read_direct(NbdState *s, NbdConn *c, uint64_t off, uint64_t len, uint8_t *buf)
{
    return nbdc_run_cmds(c, OP_READ, off, len, buf, s->max_io, 0);
}

static int write_direct(NbdState *s, NbdConn *c, uint64_t off, uint64_t len,
                        const uint8_t *buf, uint32_t nflags)
{
    /* libnbd only reads a write's buffer. */
    return nbdc_run_cmds(c, OP_WRITE, off, len, (uint8_t *)buf, s->max_io, nflags);
}

/* The server block containing off: [*start, *start + *blen), clipped at the export's end. */
static void block_around(NbdState *s, uint64_t off, uint64_t *start, uint64_t *blen)
{
    *start = off - off % s->align;
    *blen = s->size - *start < s->align ? s->size - *start : s->align;
}

static int nbd_drv_pread(BlockNode *bs, uint64_t offset, uint64_t bytes, void *buf)
{
    NbdState *s = ns_of(bs);
    uint8_t *out = buf;
    /* Past the end reads zeroes, like a file's tail (formats read whole clusters). */
    if (offset >= s->size) {
        memset(out, 0, bytes);
        return 0;
    }
    if (bytes > s->size - offset) {
        memset(out + (s->size - offset), 0, bytes - (s->size - offset));
        bytes = s->size - offset;
    }
    NbdConn *c = nbdc_conn_pick(s);
    if (s->align == 1) {
        return read_direct(s, c, offset, bytes, out);
    }
    uint8_t *bounce = NULL;
    int ret = 0;
    while (bytes > 0 && ret == 0) {
        uint64_t in = offset % s->align;
        uint64_t n;
        if (in == 0 && (bytes >= s->align || offset + bytes == s->size)) {
            n = bytes >= s->align ? bytes - bytes % s->align : bytes;
            ret = read_direct(s, c, offset, n, out);
        } else {
            /* A partial server block: read it whole, copy the caller's part. */
            uint64_t start, blen;
            block_around(s, offset, &start, &blen);
            if (!bounce && !(bounce = malloc(s->align))) {
                return -ENOMEM;
            }
            n = blen - in < bytes ? blen - in : bytes;
            ret = read_direct(s, c, start, blen, bounce);
            if (ret == 0) {
                memcpy(out, bounce + in, n);
            }
        }
        out += n;
        offset += n;
        bytes -= n;
    }
    free(bounce);
    return ret;
}

static int nbd_drv_flush(BlockNode *bs);

/* Write (align > 1 aware); nflags are libnbd command flags for every command sent. */
static int do_write(NbdState *s, uint64_t offset, uint64_t bytes, const uint8_t *in,
                    uint32_t nflags)
{
    NbdConn *c = nbdc_conn_pick(s);
    if (s->align == 1) {
        return write_direct(s, c, offset, bytes, in, nflags);
    }
    uint8_t *bounce = NULL;
    int ret = 0;
    while (bytes > 0 && ret == 0) {
        uint64_t in_off = offset % s->align;
        uint64_t n;
        if (in_off == 0 && (bytes >= s->align || offset + bytes == s->size)) {
            n = bytes >= s->align ? bytes - bytes % s->align : bytes;
            vd_rwlock_rdlock(&s->rmw_lock);
            ret = write_direct(s, c, offset, n, in, nflags);
            vd_rwlock_unlock(&s->rmw_lock);
        } else {
            uint64_t start, blen;
            block_around(s, offset, &start, &blen);
            if (!bounce && !(bounce = malloc(s->align))) {
                return -ENOMEM;
            }
            n = blen - in_off < bytes ? blen - in_off : bytes;
            vd_rwlock_wrlock(&s->rmw_lock);
            ret = read_direct(s, c, start, blen, bounce);
            if (ret == 0) {
                memcpy(bounce + in_off, in, n);
                ret = write_direct(s, c, start, blen, bounce, nflags);
            }
            vd_rwlock_unlock(&s->rmw_lock);
        }
        in += n;
        offset += n;
        bytes -= n;
    }
    free(bounce);
    return ret;
}

/*
 * A write, zero or trim may go ahead (once no fence covers its range). Past the export's end
 * (which cannot grow) a write fails with ENOSPC and a trim with EINVAL, as nbdkit and qemu-nbd
 * answer QEMU's client.
 */
static int check_write(NbdState *s, uint64_t offset, uint64_t bytes, int past_end)
{
    if (s->read_only) {
        return -EPERM;
    }
    if (offset > s->size || bytes > s->size - offset) {
        return past_end;
    }
    nbdc_fence_wait(s, offset, bytes);
    return 0;
}

static int nbd_drv_pwrite(BlockNode *bs, uint64_t offset, uint64_t bytes, const void *buf,
                          int flags)
{
    NbdState *s = ns_of(bs);
    int ret = check_write(s, offset, bytes, -ENOSPC);
    if (ret < 0) {
        return ret;
    }
    bool fua = (flags & VD_REQ_FUA) && s->can_fua;
    ret = do_write(s, offset, bytes, buf, fua ? LIBNBD_CMD_FLAG_FUA : 0);
    if (ret == 0 && (flags & VD_REQ_FUA) && !fua) {
        ret = nbd_drv_flush(bs);
    }
    return ret;
}

static int nbd_drv_pwrite_zeroes(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    NbdState *s = ns_of(bs);
    int ret = check_write(s, offset, bytes, -ENOSPC);
    if (ret < 0) {
        return ret;
    }
    if (!s->can_zero) {
        return -ENOTSUP; /* the generic layer writes zero buffers */
    }
    if ((flags & VD_REQ_NO_FALLBACK) && !s->can_fast_zero) {
        return -ENOTSUP;
    }
    bool fua = (flags & VD_REQ_FUA) && s->can_fua;
    uint32_t nflags = fua ? LIBNBD_CMD_FLAG_FUA : 0;
    if (!(flags & VD_REQ_MAY_UNMAP)) {
        nflags |= LIBNBD_CMD_FLAG_NO_HOLE;
    }
    if ((flags & VD_REQ_NO_FALLBACK) && s->can_fast_zero) {
        nflags |= LIBNBD_CMD_FLAG_FAST_ZERO;
    }
    /* Partial server blocks at the edges go through the write path (read-modify-write). */
    uint64_t head = (s->align - offset % s->align) % s->align;
    if (head > bytes) {
        head = bytes;
    }
    uint64_t tail = (bytes - head) % s->align;
    if (offset + bytes == s->size) {
        tail = 0; /* a short last block is a whole block */
    }
    if ((head || tail) && (flags & VD_REQ_NO_FALLBACK)) {
        return -ENOTSUP;
    }
    uint8_t *zero = NULL;
    if (head || tail) {
        zero = calloc(1, s->align);
        if (!zero) {
            return -ENOMEM;
        }
    }
    uint32_t wflags = fua ? LIBNBD_CMD_FLAG_FUA : 0;
    if (head) {
        ret = do_write(s, offset, head, zero, wflags);
    }
    uint64_t off = offset + head;
    uint64_t mid = bytes - head - tail;
    if (ret == 0 && mid > 0) {
        /* Shared like any aligned write, so a concurrent read-modify-write cannot undo it. */
        if (s->align > 1) {
            vd_rwlock_rdlock(&s->rmw_lock);
        }
        ret = nbdc_run_cmds(nbdc_conn_pick(s), OP_ZERO, off, mid, NULL, NBD_CMD_MAX, nflags);
        /* Servers refuse FAST_ZERO with ENOTSUP (some say EOPNOTSUPP). */
        ret = ret == -EOPNOTSUPP ? -ENOTSUP : ret;
        off += mid;
        if (s->align > 1) {
            vd_rwlock_unlock(&s->rmw_lock);
        }
    }
    if (ret == 0 && tail) {
        ret = do_write(s, off, tail, zero, wflags);
    }
    free(zero);
    if (ret == 0 && (flags & VD_REQ_FUA) && !fua) {
        ret = nbd_drv_flush(bs);
    }
    return ret;
}

static int nbd_drv_pdiscard(BlockNode *bs, uint64_t offset, uint64_t bytes, int flags)
{
    NbdState *s = ns_of(bs);
    int ret = check_write(s, offset, bytes, -EINVAL);
    if (ret < 0) {
        return ret;
    }
    if (!s->can_trim) {
        return -ENOTSUP; /* discard is advisory: the generic layer makes it a no-op */
    }
    /* Trim only whole server blocks; the edges are simply left alone (advisory). */
    uint64_t start = (offset + s->align - 1) / s->align * s->align;
    uint64_t end = offset + bytes;
    if (end != s->size) {
        end -= end % s->align;
    }
    if (start >= end) {
        return 0;
    }
    ret = nbdc_run_cmds(nbdc_conn_pick(s), OP_TRIM, start, end - start, NULL, NBD_CMD_MAX, 0);
    return ret == -EOPNOTSUPP ? -ENOTSUP : ret;
}

static int nbd_drv_flush(BlockNode *bs)
{
    NbdState *s = ns_of(bs);
    if (s->read_only || !s->can_flush || s->nconns == 0) {
        return 0; /* nothing we wrote, or a server that does not cache */
    }
    /* With multi-conn a flush on one connection covers writes completed on all of them. */
    return nbdc_run_one(nbdc_conn_pick(s), OP_FLUSH, 0, 0, 0, NULL);
}

typedef struct ExtentFirst {
    uint32_t len;
    uint32_t flags;
    bool got;
} ExtentFirst;

static int extent_cb(void *opaque, const char *metacontext, uint64_t offset, uint32_t *entries,
                     size_t nr_entries, int *error)
{
    ExtentFirst *f = opaque;
    /* Servers may send other contexts (or, if buggy, repeat ours): keep base:allocation's first. */
    if (strcmp(metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0 || f->got || nr_entries < 2) {
        return 0;
    }
    f->len = entries[0];
    f->flags = entries[1];
    f->got = true;
    return 0;
}

static int nbd_drv_block_status(BlockNode *bs, uint64_t offset, uint64_t bytes, uint64_t *pnum,
                                uint64_t *map, BlockNode **file)
{
    NbdState *s = ns_of(bs);
    /* Like QEMU's nbd driver: the node maps identically onto itself. */
    int ret = VD_BS_ALLOCATED | VD_BS_OFFSET_VALID;
    *map = offset;
    *file = bs;
    *pnum = bytes;
    if (!s->has_base_alloc) {
        return ret | VD_BS_DATA;
    }
    if (offset >= s->size) {
        /* The sector-rounding tail (vd_getlength) reads zeroes and has no offset, as QEMU's. */
        return VD_BS_ZERO | VD_BS_ALLOCATED;
    }
    uint64_t count = bytes < NBD_CMD_MAX ? bytes : NBD_CMD_MAX;
    if (count > s->size - offset) {
        count = s->size - offset;
    }
    if (s->align > 1) {
        /* The server only answers for whole blocks: call a partial block data. */
        uint64_t in = offset % s->align;
        if (in) {
            uint64_t n = s->align - in;
            *pnum = n < bytes ? n : bytes;
            return ret | VD_BS_DATA;
        }
        if (offset + count != s->size) {
            count -= count % s->align;
        }
        if (count == 0) {
            return ret | VD_BS_DATA;
        }
    }
    ExtentFirst f = { 0 };
    nbd_extent_callback cb = { .callback = extent_cb, .user_data = &f };
    int r = nbdc_run_one(nbdc_conn_pick(s), OP_STATUS, offset, count, LIBNBD_CMD_FLAG_REQ_ONE, &cb);
    if (r < 0) {
        return r;
    }
    if (!f.got || f.len == 0) {
        return ret | VD_BS_DATA; /* no answer for this range: assume data (always safe) */
    }
    *pnum = f.len < bytes ? f.len : bytes;
    if (!(f.flags & LIBNBD_STATE_HOLE)) {
        ret |= VD_BS_DATA;
    }
    if (f.flags & LIBNBD_STATE_ZERO) {
        ret |= VD_BS_ZERO;
    }
    return ret;
}

static int64_t nbd_drv_getlength(BlockNode *bs)
{
    return (int64_t)ns_of(bs)->size;
}

/*
 * An export cannot grow: "resizing" to at most its size is a no-op (a format's file may be
 * smaller than the export that holds it, as qcow2 on a block device), growing is refused.
 */
static int nbd_drv_truncate(BlockNode *bs, uint64_t size, bool shrink, VdPrealloc prealloc,
                            VdError **errp)
{
    NbdState *s = ns_of(bs);
    if (size > s->size) {
        vd_error_setg(errp, ENOTSUP, "Cannot grow NBD export '%s' (%llu bytes) to %llu bytes",
                      bs->filename, (unsigned long long)s->size, (unsigned long long)size);
        return -ENOTSUP;
    }
    return 0;
}

/*
 * "Creating" an image on an export (qemu-img create/convert onto nbd://): the export exists
 * already; check it is writable and large enough, and zero its first sector so an old format
 * header cannot be probed later (what QEMU's generic protocol create does).
 */
static int nbd_drv_create(const char *filename, const VdCreateOptions *opts, VdError **errp)
{
    VdOpenOptions o = { .filename = filename, .format = "nbd", .flags = VD_OPEN_RDWR };
    VdError *local = NULL;
    BlockNode *bs = vd_open(&o, &local);
    if (!bs) {
        int code = vd_error_code(local);
        /* QEMU's bdrv_create_file_fallback */
        vd_error_prepend(&local, "Protocol driver 'nbd' does not support image creation, and "
                         "opening the image failed: ");
        vd_error_propagate(errp, local);
        return code > 0 ? -code : -EIO;
    }
    NbdState *s = ns_of(bs);
    int ret = 0;
    if (s->read_only) {
        vd_error_setg(errp, EPERM, "Could not create '%s': the NBD export is read-only",
                      filename);
        ret = -EPERM;
    } else if (opts->size > s->size) {
        vd_error_setg(errp, ENOSPC, "Could not create '%s': the NBD export has %llu bytes, "
                      "%llu needed", filename, (unsigned long long)s->size,
                      (unsigned long long)opts->size);
        ret = -ENOSPC;
    } else if (s->size > 0) {
        ret = vd_pwrite_zeroes(bs, 0, s->size < 512 ? s->size : 512, 0);
        if (ret < 0) {
            vd_error_setg_errno(errp, -ret, "Could not create '%s': writing the first sector "
                                "failed", filename);
        }
    }
    vd_node_unref(bs);
    return ret;
}

/* The schemes libnbd's nbd_connect_uri takes (TLS: nbds; a Unix socket: +unix; vsock). */
static const char *const nbd_uri_schemes[] = {
    "nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock", "nbd+tcp", NULL,
};

static int nbd_drv_probe(const uint8_t *buf, size_t len, const char *filename)
{
    return 0; /* a protocol, never a format guess */
}

/* BlockdevOptionsNbd; tls-creds names a tls-creds object (VdOpenOptions.tls_creds). */
static const VdOptSpec nbd_blockdev_options[] = {
    {"server", VD_OPT_SOCKADDR, true},
    {"export", VD_OPT_STR},
    {"tls-creds", VD_OPT_STR},
    {"tls-hostname", VD_OPT_STR, .unsupported = " (libnbd 1.14 can check the server's "
                                                "certificate against server.host only)"},
    {"x-dirty-bitmap", VD_OPT_STR},
    {"reconnect-delay", VD_OPT_U32},
    {"open-timeout", VD_OPT_U32},
    {"x-stall-timeout", VD_OPT_U32},
    {NBD_URI_CC, VD_OPT_STR},
    {NULL}};

/* A legacy option's value as QemuOpts holds it: a string, or a number's decimal digits. */
static char *legacy_value(json_t *o, const char *key, VdError **errp)
{
    json_t *v = json_object_get(o, key);
    char *out = NULL;
    if (json_is_string(v)) {
        out = strdup(json_string_value(v));
    } else if (json_is_integer(v)) {
        if (asprintf(&out, "%" JSON_INTEGER_FORMAT, json_integer_value(v)) < 0) {
            out = NULL;
        }
    } else {
        vd_error_setg(errp, EINVAL, "Invalid parameter type for '%s', expected: string", key);
        return NULL;
    }
    if (!out) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
    }
    return out;
}

/*
 * QEMU's legacy nbd address options (qemu-img --image-opts driver=nbd,path=SOCK or
 * host=H[,port=P], and json:): made server.* as QEMU's nbd_process_legacy_socket_options does,
 * with its checks and messages; a missing port is NBD's 10809. Only port: dropped, so the node
 * has no address ("NBD server address missing", as QEMU says).
 */
static int nbd_legacy_options(json_t *o, VdError **errp)
{
    static const char *const keys[] = {"path", "host", "port"};
    char *val[3] = {NULL, NULL, NULL};
    bool any = false;
    int ret = 0;
    for (int i = 0; i < 3; i++) {
        if (json_object_get(o, keys[i])) {
            any = true;
            if (!(val[i] = legacy_value(o, keys[i], errp))) {
                ret = -EINVAL;
                goto out;
            }
        }
    }
    const char *path = val[0], *host = val[1], *port = val[2];
    if (!any) {
        return 0;
    }
    ret = -EINVAL;
    if (json_object_get(o, "server")) {
        vd_error_setg(errp, EINVAL, "Cannot use 'server' and path/host/port at the same time");
        goto out;
    }
    if (path && host) {
        vd_error_setg(errp, EINVAL, "path and host may not be used at the same time");
        goto out;
    }
    if (path && port) {
        vd_error_setg(errp, EINVAL, "port may not be used without host");
        goto out;
    }
    json_t *server = NULL;
    if (path) {
        server = json_pack("{s:s, s:s}", "type", "unix", "path", path);
    } else if (host) {
        server = json_pack("{s:s, s:s, s:s}", "type", "inet", "host", host, "port",
                           port ? port : "10809");
    }
    if ((path || host) && (!server || json_object_set_new(o, "server", server) < 0)) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        goto out;
    }
    for (int i = 0; i < 3; i++) {
        json_object_del(o, keys[i]);
    }
    ret = 0;
out:
    for (int i = 0; i < 3; i++) {
        free(val[i]);
    }
    return ret;
}

/*
 * The libnbd URI of a blockdev-add nbd node: percent-encoded, so any export name works; nbds://
 * (TLS) with tls-creds, whose files nbd_drv_open gives libnbd itself.
 */
static char *nbd_blockdev_filename(const VdOptReader *o, VdError **errp)
{
    const char *type = o->str(o, "server.type");
    bool is_unix = type && !strcmp(type, "unix");
    /*
     * What QEMU says of an incomplete address (blockdev-add checks it before this; the tools'
     * trees reach here unchecked). An inet server has no default port there, unlike a URI.
     */
    const char *port = o->str(o, "server.port");
    char port_num[24]; /* json: may give it as a number, as QEMU takes it there */
    unsigned long long pn;
    if (!port && o->num(o, "server.port", &pn)) {
        snprintf(port_num, sizeof(port_num), "%llu", pn);
        port = port_num;
    }
    const char *missing = !type ? "type"
                          : !o->str(o, is_unix ? "server.path" : "server.host")
                              ? (is_unix ? "path" : "host")
                          : !is_unix && !port ? "port" : NULL;
    if (missing) {
        bool has_server = false;
        static const char *const members[] = {"server.type", "server.path", "server.host",
                                              "server.port"};
        for (size_t i = 0; i < sizeof(members) / sizeof(members[0]); i++) {
            has_server = has_server || o->str(o, members[i]) || o->num(o, members[i], &pn);
        }
        vd_error_setg(errp, EINVAL, has_server ? "Parameter '%s' is missing"
                                               : "NBD server address missing", missing);
        return NULL;
    }
    const char *exp = o->str(o, "export");
    char *uri = vd_nbd_make_uri(is_unix ? NULL : o->str(o, "server.host"),
                                is_unix ? NULL : port,
                                is_unix ? o->str(o, "server.path") : NULL, exp ? exp : "");
    if (uri && o->str(o, "tls-creds")) {
        char *tls_uri = NULL; /* "nbd://..." / "nbd+unix://...": the same with "nbds" */
        if (asprintf(&tls_uri, "nbds%s", uri + 3) < 0) {
            tls_uri = NULL;
            errno = ENOMEM;
        }
        free(uri);
        uri = tls_uri;
    }
    /* The link options travel in the URI as vdisk's own parameters (uri_take_options). */
    for (size_t i = 0; uri && i < sizeof(nbd_uri_opts) / sizeof(nbd_uri_opts[0]); i++) {
        unsigned long long v;
        if (!o->num(o, nbd_uri_opts[i].key, &v)) {
            continue;
        }
        char *with = NULL;
        if (asprintf(&with, "%s%c%s=%llu", uri, strchr(uri, '?') ? '&' : '?',
                     nbd_uri_opts[i].key, v) < 0) {
            with = NULL;
            errno = ENOMEM;
        }
        free(uri);
        uri = with;
    }
    const char *cc = uri ? o->str(o, NBD_URI_CC) : NULL;
    if (cc && (!*cc || strspn(cc, "abcdefghijklmnopqrstuvwxyz0123456789_") != strlen(cc))) {
        vd_error_setg(errp, EINVAL, "Parameter '%s' expects the name of a TCP congestion "
                      "control algorithm", NBD_URI_CC);
        free(uri);
        return NULL;
    }
    if (cc) {
        char *with = NULL;
        if (asprintf(&with, "%s%c%s=%s", uri, strchr(uri, '?') ? '&' : '?', NBD_URI_CC, cc) < 0) {
            with = NULL;
            errno = ENOMEM;
        }
        free(uri);
        uri = with;
    }
    if (!uri) {
        struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai = NULL;
        int gai = 0;
        if (errno == EINVAL && !is_unix && port && *port &&
            (gai = getaddrinfo(o->str(o, "server.host"), port, &hints, &ai)) != 0) {
            /* a port that is no number: what QEMU's resolver says of it */
            vd_error_setg(errp, EINVAL, "address resolution failed for %s:%s: %s",
                          o->str(o, "server.host"), port, gai_strerror(gai));
        } else if (errno == EINVAL || ai) {
            vd_error_setg(errp, EINVAL, "NBD server: invalid %s", is_unix ? "socket path"
                          : "host or port (a port is a number)");
        } else {
            vd_error_setg(errp, ENOMEM, "Out of memory");
        }
        if (ai) {
            freeaddrinfo(ai);
        }
    }
    return uri;
}

const BlockDriver vd_drv_nbd = {
    .name = "nbd",
    .is_protocol = true,
    .supports_backing = false,
    .uri_schemes = nbd_uri_schemes,
    .blockdev_options = nbd_blockdev_options,
    .blockdev_filename = nbd_blockdev_filename,
    .legacy_options = nbd_legacy_options,
    .may_block = true,
    .state_size = sizeof(NbdState),
    .probe = nbd_drv_probe,
    .open = nbd_drv_open,
    .close = nbd_drv_close,
    .pread = nbd_drv_pread,
    .pwrite = nbd_drv_pwrite,
    .pwrite_zeroes = nbd_drv_pwrite_zeroes,
    .pdiscard = nbd_drv_pdiscard,
    .flush = nbd_drv_flush,
    .block_status = nbd_drv_block_status,
    .getlength = nbd_drv_getlength,
    .truncate = nbd_drv_truncate,
    .create = nbd_drv_create,
};

/* ---- opening from options (blockdev-add) ---- */

BlockNode *vd_nbd_open(const char *host, const char *port, const char *unix_path,
                       const char *export_name, const char *node_name, int flags,
                       VdError **errp)
{
    bool has_host = host && *host;
    bool has_unix = unix_path && *unix_path;
    if (has_host == has_unix) {
        vd_error_setg(errp, EINVAL, "NBD server: give exactly one of a host (inet) or a "
                      "socket path (unix)");
        return NULL;
    }
    char *uri = vd_nbd_make_uri(host, port, unix_path, export_name);
    if (!uri) {
        if (errno == EINVAL) {
            vd_error_setg(errp, EINVAL, "NBD server: invalid port '%s'", port ? port : "");
        } else {
            vd_error_setg(errp, ENOMEM, "Out of memory");
        }
        return NULL;
    }
    VdOpenOptions o = { .filename = uri, .format = "nbd", .node_name = node_name,
                        .flags = flags };
    BlockNode *bs = vd_open(&o, errp);
    free(uri);
    return bs;
}

BlockNode *vd_nbd_open_qmp(json_t *options, int flags, VdError **errp)
{
    if (!json_is_object(options)) {
        vd_error_setg(errp, EINVAL, "nbd: options must be an object");
        return NULL;
    }
    json_t *server = json_object_get(options, "server");
    if (!json_is_object(server)) {
        vd_error_setg(errp, EINVAL, "nbd: parameter 'server' is missing");
        return NULL;
    }
    const char *type = json_string_value(json_object_get(server, "type"));
    const char *host = NULL, *path = NULL;
    char portbuf[24];
    const char *port = NULL;
    if (!type) {
        vd_error_setg(errp, EINVAL, "nbd: parameter 'server.type' is missing");
        return NULL;
    }
    if (!strcmp(type, "inet")) {
        host = json_string_value(json_object_get(server, "host"));
        json_t *jp = json_object_get(server, "port");
        if (json_is_string(jp)) {
            port = json_string_value(jp);
        } else if (json_is_integer(jp)) {
            snprintf(portbuf, sizeof(portbuf), "%lld", (long long)json_integer_value(jp));
            port = portbuf;
        } else if (jp) {
            vd_error_setg(errp, EINVAL, "nbd: 'server.port' must be a string or an integer");
            return NULL;
        }
        if (!host || !*host) {
            vd_error_setg(errp, EINVAL, "nbd: parameter 'server.host' is missing");
            return NULL;
        }
    } else if (!strcmp(type, "unix")) {
        path = json_string_value(json_object_get(server, "path"));
        if (!path || !*path) {
            vd_error_setg(errp, EINVAL, "nbd: parameter 'server.path' is missing");
            return NULL;
        }
    } else {
        vd_error_setg(errp, EINVAL, "nbd: unsupported server type '%s' (inet or unix)", type);
        return NULL;
    }
    json_t *jexp = json_object_get(options, "export");
    if (jexp && !json_is_string(jexp)) {
        vd_error_setg(errp, EINVAL, "nbd: 'export' must be a string");
        return NULL;
    }
    if (json_is_true(json_object_get(options, "read-only"))) {
        flags &= ~VD_OPEN_RDWR;
    }
    const char *node_name = json_string_value(json_object_get(options, "node-name"));
    return vd_nbd_open(host, port, path, json_string_value(jexp), node_name, flags, errp);
}
