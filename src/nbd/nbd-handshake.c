/*
 * nbd-handshake.c - fixed newstyle negotiation for one connection (runs on its reader thread).
 * Promises: every malformed or unsupported option gets an error reply when the stream is still in
 * sync, otherwise the client alone is dropped; no option payload larger than 1 MiB is buffered.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nbd/nbd-protocol.h"

#define NBD_OPT_DISCARD_LIMIT (1u << 20)

static int send_rep(NbdConn *c, uint32_t opt, uint32_t type, const void *data, uint32_t len)
{
    uint8_t h[20];
    nbd_put64(h, NBD_REP_MAGIC);
    nbd_put32(h + 8, opt);
    nbd_put32(h + 12, type);
    nbd_put32(h + 16, len);
    int r = nbd_conn_write(c, h, sizeof(h));
    if (r == 0 && len) {
        r = nbd_conn_write(c, data, len);
    }
    return r;
}

static int send_err(NbdConn *c, uint32_t opt, uint32_t type, const char *msg)
{
    return send_rep(c, opt, type, msg, msg ? (uint32_t)strlen(msg) : 0);
}

static uint16_t export_tflags(const NbdExport *exp)
{
    uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |
                 NBD_FLAG_SEND_CACHE | NBD_FLAG_CAN_MULTI_CONN;
    if (exp->writable) {
        f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
    } else {
        f |= NBD_FLAG_READ_ONLY;
    }
    return f;
}

static int64_t export_size(NbdExport *exp)
{
    int64_t len = vd_getlength(nbd_export_node(exp));
    return len < 0 ? 0 : len;
}

/* NBD_OPT_LIST: one NBD_REP_SERVER per export, then ACK. */
struct list_ctx {
    NbdConn *c;
    int err;
};

static void list_one(NbdExport *exp, void *opaque)
{
    struct list_ctx *lc = opaque;
    if (lc->err) {
        return;
    }
    size_t nl = strlen(exp->name), dl = exp->description ? strlen(exp->description) : 0;
    uint8_t *buf = malloc(4 + nl + dl);
    if (!buf) {
        lc->err = -ENOMEM;
        return;
    }
    nbd_put32(buf, (uint32_t)nl);
    memcpy(buf + 4, exp->name, nl);
    if (dl) {
        memcpy(buf + 4 + nl, exp->description, dl);
    }
    lc->err = send_rep(lc->c, NBD_OPT_LIST, NBD_REP_SERVER, buf, (uint32_t)(4 + nl + dl));
    free(buf);
}

/* NBD_OPT_INFO / NBD_OPT_GO. Returns 1 when GO succeeded (transmission starts), 0 to continue. */
static int opt_info_go(NbdConn *c, uint32_t opt, const uint8_t *p, uint32_t len)
{
    if (len < 6) {
        return send_err(c, opt, NBD_REP_ERR_INVALID, "option too short");
    }
    uint32_t nl = nbd_get32(p);
    if (nl > NBD_MAX_STRING || (uint64_t)4 + nl + 2 > len) {
        return send_err(c, opt, NBD_REP_ERR_INVALID, "bad export name length");
    }
    uint16_t nreq = nbd_get16(p + 4 + nl);
    if ((uint64_t)4 + nl + 2 + 2u * nreq != len) {
        return send_err(c, opt, NBD_REP_ERR_INVALID, "bad information request count");
    }
    char name[NBD_MAX_STRING + 1];
    memcpy(name, p + 4, nl);
    name[nl] = 0;
    if (memchr(name, 0, nl)) {
        return send_err(c, opt, NBD_REP_ERR_INVALID, "NUL in export name");
    }
    bool want_name = false, want_desc = false;
    for (uint16_t i = 0; i < nreq; i++) {
        uint16_t t = nbd_get16(p + 4 + nl + 2 + 2 * i);
        want_name |= t == NBD_INFO_NAME;
        want_desc |= t == NBD_INFO_DESCRIPTION;
    }
    NbdExport *exp = nbd_server_get_export(name);
    if (!exp) {
        if (nbd_server_shutting_down()) {
            return send_err(c, opt, NBD_REP_ERR_SHUTDOWN, "server shutting down");
        }
        return send_err(c, opt, NBD_REP_ERR_UNKNOWN, "export not found");
    }

    uint8_t buf[12 + NBD_MAX_STRING];
    int r;
    nbd_put16(buf, NBD_INFO_EXPORT);
    nbd_put64(buf + 2, (uint64_t)export_size(exp));
    nbd_put16(buf + 10, export_tflags(exp));
    r = send_rep(c, opt, NBD_REP_INFO, buf, 12);
    if (r == 0 && want_name) {
        size_t l = strlen(exp->name);
        nbd_put16(buf, NBD_INFO_NAME);
        memcpy(buf + 2, exp->name, l);
        r = send_rep(c, opt, NBD_REP_INFO, buf, (uint32_t)(2 + l));
    }
    if (r == 0 && want_desc && exp->description) {
        size_t l = strlen(exp->description);
        nbd_put16(buf, NBD_INFO_DESCRIPTION);
        memcpy(buf + 2, exp->description, l);
        r = send_rep(c, opt, NBD_REP_INFO, buf, (uint32_t)(2 + l));
    }
    if (r == 0) {
        /* Sent even unrequested: min 1 means "no alignment needed", so any client copes. */
        nbd_put16(buf, NBD_INFO_BLOCK_SIZE);
        nbd_put32(buf + 2, NBD_MIN_BLOCK);
        nbd_put32(buf + 6, NBD_PREF_BLOCK);
        nbd_put32(buf + 10, NBD_MAX_PAYLOAD);
        r = send_rep(c, opt, NBD_REP_INFO, buf, 14);
    }
    if (r < 0 || opt == NBD_OPT_INFO) {
        if (r == 0) {
            r = send_rep(c, opt, NBD_REP_ACK, NULL, 0);
        }
        nbd_export_unref(exp);
        return r;
    }
    if (c->meta_export && strcmp(c->meta_export, name) != 0) {
        nbd_meta_reset(c); /* contexts were selected for another export */
    }
    c->tflags = export_tflags(exp);
    /* Count the client before it hears ACK: from then on it may send requests. */
    r = nbd_conn_attach(c, exp);
    if (r == -ESHUTDOWN) {
        return send_err(c, opt, NBD_REP_ERR_SHUTDOWN, "server shutting down");
    } else if (r < 0) {
        return send_err(c, opt, NBD_REP_ERR_UNKNOWN, "export was removed");
    }
    r = send_rep(c, opt, NBD_REP_ACK, NULL, 0);
    return r < 0 ? r : 1;
}

static int opt_meta(NbdConn *c, uint32_t opt, const uint8_t *p, uint32_t len)
{
    bool list = opt == NBD_OPT_LIST_META_CONTEXT;
    if (!c->structured) {
        return send_err(c, opt, NBD_REP_ERR_INVALID, "structured replies not negotiated");
    }
    if (len < 8) {
        return send_err(c, opt, NBD_REP_ERR_INVALID, "option too short");
    }
    uint32_t nl = nbd_get32(p);
    if (nl > NBD_MAX_STRING || (uint64_t)4 + nl + 4 > len) {
        return send_err(c, opt, NBD_REP_ERR_INVALID, "bad export name length");
    }
    char name[NBD_MAX_STRING + 1];
    memcpy(name, p + 4, nl);
    name[nl] = 0;
    uint32_t nq = nbd_get32(p + 4 + nl);
    /* Validate every query before answering anything. */
    const uint64_t first = 4 + (uint64_t)nl + 4;
    uint64_t pos = first;
    for (uint32_t i = 0; i < nq; i++) {
        if (pos + 4 > len) {
            return send_err(c, opt, NBD_REP_ERR_INVALID, "truncated query");
        }
        uint32_t ql = nbd_get32(p + pos);
        if (ql > NBD_MAX_STRING || pos + 4 + ql > len) {
            return send_err(c, opt, NBD_REP_ERR_INVALID, "bad query length");
        }
        pos += 4 + ql;
    }
    if (pos != len) {
        return send_err(c, opt, NBD_REP_ERR_INVALID, "trailing bytes in option");
    }
    NbdExport *exp = nbd_server_get_export(name);
    if (!exp) {
        return send_err(c, opt, NBD_REP_ERR_UNKNOWN, "export not found");
    }
    uint32_t nctx = nbd_meta_count(exp);
    bool *sel = calloc(nctx, sizeof(*sel));
    char *saved = list ? NULL : strdup(name);
    if (!sel || (!list && !saved)) {
        free(sel);
        nbd_export_unref(exp);
        return send_err(c, opt, NBD_REP_ERR_INVALID, "out of memory");
    }
    for (pos = first; pos < len; pos += 4 + nbd_get32(p + pos)) {
        nbd_meta_match(exp, p + pos + 4, nbd_get32(p + pos), list, sel);
    }
    if (list && nq == 0) {
        memset(sel, 1, nctx * sizeof(*sel)); /* empty LIST: every context the export has */
    }
    int r = 0;
    uint8_t buf[4 + NBD_MAX_STRING + 1];
    for (uint32_t i = 0; i < nctx && r == 0; i++) {
        if (sel[i]) {
            nbd_put32(buf, list ? 0 : i + 1);
            size_t l = nbd_meta_name(exp, i, (char *)buf + 4);
            r = send_rep(c, opt, NBD_REP_META_CONTEXT, buf, (uint32_t)(4 + l));
        }
    }
    nbd_export_unref(exp);
    if (list) {
        free(sel);
    } else { /* a SET replaces the previous selection, even when it selects nothing */
        nbd_meta_reset(c);
        c->meta_sel = sel;
        c->meta_nsel = nctx;
        free(c->meta_export);
        c->meta_export = saved;
    }
    if (r == 0) {
        r = send_rep(c, opt, NBD_REP_ACK, NULL, 0);
    }
    return r;
}

static int send_tls_reqd(NbdConn *c, uint32_t opt)
{
    char msg[64];
    snprintf(msg, sizeof(msg), "Option 0x%" PRIx32 " not permitted before TLS", opt);
    return send_err(c, opt, NBD_REP_ERR_TLS_REQD, msg);
}

/* NBD_OPT_STARTTLS: acknowledge in clear, then the TLS handshake (nbd-tls.c). */
static int opt_starttls(NbdConn *c, uint32_t len)
{
    if (len != 0) {
        return send_err(c, NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID, "option takes no data");
    }
    if (!c->tls_creds) {
        return send_err(c, NBD_OPT_STARTTLS, NBD_REP_ERR_POLICY, "TLS not configured");
    }
    if (c->tls) {
        return send_err(c, NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID, "TLS already enabled");
    }
    int r = send_rep(c, NBD_OPT_STARTTLS, NBD_REP_ACK, NULL, 0);
    return r < 0 ? r : nbd_tls_starttls(c);
}

int nbd_handshake(NbdConn *c)
{
    uint8_t h[18];
    nbd_put64(h, NBD_MAGIC);
    nbd_put64(h + 8, NBD_OPTS_MAGIC);
    nbd_put16(h + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    int r = nbd_conn_write(c, h, sizeof(h));
    if (r < 0) {
        return r;
    }
    uint8_t cf[4];
    if ((r = nbd_conn_read(c, cf, 4)) < 0) {
        return r;
    }
    uint32_t cflags = nbd_get32(cf);
    if (cflags & ~(uint32_t)(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
        return -EINVAL; /* unknown client flags: spec says close */
    }
    bool fixed = cflags & NBD_FLAG_C_FIXED_NEWSTYLE;
    c->no_zeroes = cflags & NBD_FLAG_C_NO_ZEROES;

    for (;;) {
        uint8_t oh[16];
        if ((r = nbd_conn_read(c, oh, sizeof(oh))) < 0) {
            return r;
        }
        if (nbd_get64(oh) != NBD_OPTS_MAGIC) {
            return -EINVAL;
        }
        uint32_t opt = nbd_get32(oh + 8);
        uint32_t len = nbd_get32(oh + 12);
        if (!fixed && opt != NBD_OPT_EXPORT_NAME) {
            return -EINVAL; /* plain newstyle: no way to reply */
        }
        if (len > NBD_MAX_OPTION_LEN) {
            if (len > NBD_OPT_DISCARD_LIMIT || opt == NBD_OPT_EXPORT_NAME) {
                return -E2BIG;
            }
            if ((r = nbd_conn_discard(c, len)) < 0 ||
                (r = send_err(c, opt, NBD_REP_ERR_TOO_BIG, "option too large")) < 0) {
                return r;
            }
            continue;
        }
        uint8_t *p = malloc(len + 1);
        if (!p) {
            return -ENOMEM;
        }
        if ((r = nbd_conn_read(c, p, len)) < 0) {
            free(p);
            return r;
        }
        p[len] = 0;

        if (nbd_server_shutting_down() && opt != NBD_OPT_ABORT) {
            r = opt == NBD_OPT_EXPORT_NAME ? -ESHUTDOWN
                                            : send_err(c, opt, NBD_REP_ERR_SHUTDOWN, "shutting down");
            free(p);
            if (r < 0) {
                return r;
            }
            continue;
        }

        if (c->tls_creds && !c->tls && opt != NBD_OPT_STARTTLS && opt != NBD_OPT_ABORT) {
            /* TLS required: nothing but STARTTLS (or ABORT) in clear, as qemu-nbd */
            free(p);
            if (opt == NBD_OPT_EXPORT_NAME) {
                return -EACCES; /* no way to reply: close */
            }
            if ((r = send_tls_reqd(c, opt)) < 0) {
                return r;
            }
            continue;
        }

        switch (opt) {
        case NBD_OPT_STARTTLS:
            r = opt_starttls(c, len);
            break;
        case NBD_OPT_EXPORT_NAME: {
            NbdExport *exp = (len <= NBD_MAX_STRING && !memchr(p, 0, len))
                                 ? nbd_server_get_export((char *)p) : NULL;
            if (!exp) {
                free(p);
                return -ENOENT; /* no way to report an error: close */
            }
            uint8_t rep[10 + 124] = {0};
            nbd_put64(rep, (uint64_t)export_size(exp));
            nbd_put16(rep + 8, export_tflags(exp));
            if (c->meta_export && strcmp(c->meta_export, (char *)p) != 0) {
                nbd_meta_reset(c);
            }
            free(p);
            c->tflags = export_tflags(exp);
            if ((r = nbd_conn_attach(c, exp)) < 0) {
                return r; /* deleted meanwhile: no way to say so but hanging up */
            }
            return nbd_conn_write(c, rep, c->no_zeroes ? 10 : sizeof(rep));
        }
        case NBD_OPT_ABORT:
            send_rep(c, opt, NBD_REP_ACK, NULL, 0); /* best effort: the client may be gone */
            free(p);
            return -ECONNABORTED;
        case NBD_OPT_LIST:
            if (len != 0) {
                r = send_err(c, opt, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
            } else {
                struct list_ctx lc = {.c = c};
                nbd_server_list_exports(list_one, &lc);
                r = lc.err ? lc.err : send_rep(c, opt, NBD_REP_ACK, NULL, 0);
            }
            break;
        case NBD_OPT_STRUCTURED_REPLY:
            if (len != 0) {
                r = send_err(c, opt, NBD_REP_ERR_INVALID, "option takes no data");
            } else if (c->structured) {
                r = send_err(c, opt, NBD_REP_ERR_INVALID, "already negotiated");
            } else {
                c->structured = true;
                r = send_rep(c, opt, NBD_REP_ACK, NULL, 0);
            }
            break;
        case NBD_OPT_INFO:
        case NBD_OPT_GO:
            r = opt_info_go(c, opt, p, len);
            if (r == 1) {
                free(p);
                return 0;
            }
            break;
        case NBD_OPT_LIST_META_CONTEXT:
        case NBD_OPT_SET_META_CONTEXT:
            r = opt_meta(c, opt, p, len);
            break;
        default:
            r = send_err(c, opt, NBD_REP_ERR_UNSUP, "option not supported");
            break;
        }
        free(p);
        if (r < 0) {
            return r;
        }
    }
}
