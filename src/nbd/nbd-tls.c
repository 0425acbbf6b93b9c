/*
 * nbd-tls.c - NBD over TLS on the server side (NBD_OPT_STARTTLS, doc/proto.md): the GnuTLS
 * handshake on a connection, the check of the peer (x509 chain, authz), and the connection's byte
 * I/O, which goes through the TLS session once there is one and straight to the socket otherwise.
 * Threads: after the handshake the reader thread only receives and the sender (serialised by
 * send_lock) only sends, which GnuTLS allows on one session at the same time.
 */
#include <errno.h>
#include <gnutls/x509.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "nbd/nbd-protocol.h"
#include "util/log.h"

#define NBD_TLS_HANDSHAKE_TRIES 100 /* non-fatal alerts tolerated during one handshake */

/* -errno for a failed record call: a timeout of the socket, a lost peer, or a broken stream. */
static int tls_errno(ssize_t gr)
{
    if (gr == GNUTLS_E_AGAIN) {
        return -ETIMEDOUT; /* blocking socket: SO_RCVTIMEO / SO_SNDTIMEO expired */
    }
    if (gr == GNUTLS_E_PREMATURE_TERMINATION || gr == GNUTLS_E_PUSH_ERROR) {
        return -EPIPE;
    }
    return -EIO;
}

ssize_t nbd_conn_recv(NbdConn *c, void *buf, size_t len)
{
    for (;;) {
        ssize_t n = c->tls ? gnutls_record_recv(c->tls, buf, len) : recv(c->fd, buf, len, 0);
        if (!c->tls) {
            if (n < 0 && errno == EINTR) {
                continue;
            }
            return n < 0 ? -errno : n;
        }
        if (n == GNUTLS_E_INTERRUPTED) {
            continue;
        }
        return n < 0 ? tls_errno(n) : n;
    }
}

int nbd_conn_read(NbdConn *c, void *buf, size_t len)
{
    if (!c->tls) {
        return nbd_read_full(c->fd, buf, len);
    }
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = nbd_conn_recv(c, p, len);
        if (n <= 0) {
            return n < 0 ? (int)n : -EPIPE;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

int nbd_conn_write(NbdConn *c, const void *buf, size_t len)
{
    if (!c->tls) {
        return nbd_write_full(c->fd, buf, len);
    }
    const uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = gnutls_record_send(c->tls, p, len);
        if (n == GNUTLS_E_INTERRUPTED) {
            continue;
        }
        if (n < 0) {
            return tls_errno(n);
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

int nbd_conn_discard(NbdConn *c, uint64_t len)
{
    uint8_t buf[4096];
    while (len > 0) {
        size_t chunk = len > sizeof(buf) ? sizeof(buf) : (size_t)len;
        int r = nbd_conn_read(c, buf, chunk);
        if (r < 0) {
            return r;
        }
        len -= chunk;
    }
    return 0;
}

/* The peer's name for authz: the x509 distinguished name of its certificate, or the PSK user. */
static char *peer_name(NbdConn *c)
{
    if (vd_tls_creds_is_psk(c->tls_creds)) {
        const char *u = gnutls_psk_server_get_username(c->tls);
        return u ? strdup(u) : NULL;
    }
    unsigned n = 0;
    const gnutls_datum_t *certs = gnutls_certificate_get_peers(c->tls, &n);
    gnutls_x509_crt_t crt;
    if (!certs || n == 0 || gnutls_x509_crt_init(&crt) < 0) {
        return NULL;
    }
    char *dn = NULL;
    size_t len = 0;
    if (gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER) == 0 &&
        gnutls_x509_crt_get_dn(crt, NULL, &len) == GNUTLS_E_SHORT_MEMORY_BUFFER &&
        (dn = malloc(len + 1)) && gnutls_x509_crt_get_dn(crt, dn, &len) < 0) {
        free(dn);
        dn = NULL;
    }
    gnutls_x509_crt_deinit(crt);
    return dn;
}

/* After the handshake: is this peer the one the credentials and tls-authz admit? */
static int check_peer(NbdConn *c)
{
    if (!vd_tls_creds_is_psk(c->tls_creds) && vd_tls_creds_verify_peer(c->tls_creds)) {
        unsigned status = 0;
        int gr = gnutls_certificate_verify_peers2(c->tls, &status);
        if (gr < 0 || status != 0) {
            gnutls_datum_t why = {0};
            if (gr == 0) {
                gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &why, 0);
            }
            vd_log(VD_LOG_INFO, "nbd: TLS client certificate refused: %s",
                   gr < 0 ? gnutls_strerror(gr) : why.data ? (char *)why.data : "invalid");
            gnutls_free(why.data);
            return -EACCES;
        }
    }
    if (!c->tls_authz) {
        return 0;
    }
    char *name = peer_name(c);
    bool ok = vd_authz_is_allowed(c->tls_authz, name);
    if (!ok) {
        vd_log(VD_LOG_INFO, "nbd: TLS client '%s' is not authorized", name ? name : "(unknown)");
    }
    free(name);
    return ok ? 0 : -EACCES;
}

int nbd_tls_starttls(NbdConn *c)
{
    gnutls_session_t s;
    VdError *err = NULL;
    if (gnutls_init(&s, GNUTLS_SERVER) < 0) {
        return -ENOMEM;
    }
    if (vd_tls_creds_setup_session(c->tls_creds, s, &err) < 0) {
        vd_log(VD_LOG_INFO, "nbd: TLS: %s", vd_error_msg(err));
        vd_error_free(err);
        gnutls_deinit(s);
        return -EINVAL;
    }
    gnutls_transport_set_int(s, c->fd);
    int gr = GNUTLS_E_AGAIN;
    for (int i = 0; i < NBD_TLS_HANDSHAKE_TRIES && gr < 0; i++) {
        gr = gnutls_handshake(s);
        if (gr < 0 && (gnutls_error_is_fatal(gr) || gr == GNUTLS_E_AGAIN)) {
            break; /* AGAIN on a blocking socket: the handshake timeout expired */
        }
    }
    if (gr < 0) {
        vd_log(VD_LOG_INFO, "nbd: TLS handshake failed: %s", gnutls_strerror(gr));
        gnutls_deinit(s);
        return -EPROTO;
    }
    c->tls = s;
    int r = check_peer(c);
    if (r < 0) {
        return r; /* nbd_tls_close ends the session */
    }
    /* The spec: what was negotiated in clear does not carry over. */
    c->structured = false;
    nbd_meta_reset(c);
    return 0;
}

void nbd_tls_close(NbdConn *c)
{
    if (c->tls) {
        gnutls_bye(c->tls, GNUTLS_SHUT_WR); /* best effort: bounded by SO_SNDTIMEO */
        gnutls_deinit(c->tls);
        c->tls = NULL;
    }
}

int nbd_server_tls_lookup(const char *tls_creds, const char *tls_authz, VdTlsCreds **creds,
                          VdAuthz **authz, VdError **errp)
{
    *creds = NULL;
    *authz = NULL;
    if (tls_authz && !tls_creds) {
        vd_error_setg(errp, EINVAL, "tls-authz is not permitted without tls-creds");
        return -EINVAL;
    }
    if (tls_creds && !(*creds = vd_tls_creds_get(tls_creds, true, errp))) {
        return -EINVAL;
    }
    if (tls_authz && !(*authz = vd_authz_get(tls_authz, errp))) {
        vd_tls_creds_unref(*creds);
        *creds = NULL;
        return -EINVAL;
    }
    return 0;
}
