/*
 * tls-creds.c - the object registry behind object-add / object-del: TLS credentials (GnuTLS,
 * loaded when added) and authz-simple. Invariants: an id is in the registry at most once; an
 * object is freed when its last reference goes (the registry's, the NBD server's, a node's), so a
 * user never sees its credentials change or vanish. One mutex guards the list and the counts.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util/lock.h"
#include "util/tls-creds.h"

typedef enum { OBJ_TLS_CREDS, OBJ_AUTHZ } ObjKind;

typedef struct VdObject {
    ObjKind kind;
    char *id;
    int refcnt;
    struct VdObject *next; /* registry list, while registered */
} VdObject;

struct VdTlsCreds {
    VdObject obj;
    bool psk, server, verify_peer;
    char *dir, *priority, *username;
    gnutls_certificate_credentials_t x509;   /* x509 */
    gnutls_psk_server_credentials_t psk_srv; /* psk, server endpoint */
};

struct VdAuthz {
    VdObject obj;
    char *identity;
};

static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static VdObject *reg_head;

static VdObject *find_locked(const char *id)
{
    for (VdObject *o = reg_head; o; o = o->next) {
        if (!strcmp(o->id, id)) {
            return o;
        }
    }
    return NULL;
}

static void creds_free(VdTlsCreds *c)
{
    if (c->x509) {
        gnutls_certificate_free_credentials(c->x509);
    }
    if (c->psk_srv) {
        gnutls_psk_free_server_credentials(c->psk_srv);
    }
    free(c->dir);
    free(c->priority);
    free(c->username);
}

static void obj_unref(VdObject *o)
{
    if (!o) {
        return;
    }
    vd_mutex_lock(&reg_lock);
    bool last = --o->refcnt == 0;
    vd_mutex_unlock(&reg_lock);
    if (!last) {
        return;
    }
    if (o->kind == OBJ_TLS_CREDS) {
        creds_free((VdTlsCreds *)o);
    } else {
        free(((VdAuthz *)o)->identity);
    }
    free(o->id);
    free(o);
}

/* Register o (refcnt 1 = the registry's) unless its id is taken (QEMU's message then). */
static int obj_register(VdObject *o, VdError **errp)
{
    vd_mutex_lock(&reg_lock);
    if (find_locked(o->id)) {
        vd_mutex_unlock(&reg_lock);
        vd_error_setg(errp, EEXIST, "attempt to add duplicate property '%s' to object "
                      "(type 'container')", o->id);
        return -EEXIST;
    }
    o->refcnt = 1;
    o->next = reg_head;
    reg_head = o;
    vd_mutex_unlock(&reg_lock);
    return 0;
}

int vd_object_del(const char *id, VdError **errp)
{
    vd_mutex_lock(&reg_lock);
    VdObject **pp = &reg_head;
    while (*pp && strcmp((*pp)->id, id) != 0) {
        pp = &(*pp)->next;
    }
    VdObject *o = *pp;
    if (o) {
        *pp = o->next;
    }
    vd_mutex_unlock(&reg_lock);
    if (!o) {
        vd_error_setg(errp, ENOENT, "object '%s' not found", id);
        return -ENOENT;
    }
    obj_unref(o);
    return 0;
}

/* A new reference to the object id of the given kind, or NULL. */
static VdObject *obj_get(const char *id, ObjKind kind)
{
    vd_mutex_lock(&reg_lock);
    VdObject *o = find_locked(id);
    if (o && o->kind == kind) {
        o->refcnt++;
    } else {
        o = NULL;
    }
    vd_mutex_unlock(&reg_lock);
    return o;
}

/* ---- TLS credentials ---- */

/* dir/name, checked readable when required (QEMU's "Unable to access credentials" otherwise). */
static char *cred_path(const char *dir, const char *name, bool required, VdError **errp)
{
    char *p = NULL;
    if (asprintf(&p, "%s/%s", dir, name) < 0) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return NULL;
    }
    if (access(p, R_OK) < 0) {
        int e = errno;
        if (required) {
            vd_error_setg_errno(errp, e, "Unable to access credentials %s", p);
        }
        free(p);
        return NULL;
    }
    return p;
}

static int gnutls_fail(VdError **errp, const char *what, const char *path, int gr)
{
    vd_error_setg(errp, EINVAL, "%s '%s': %s", what, path, gnutls_strerror(gr));
    return -EINVAL;
}

static int load_x509(VdTlsCreds *c, VdError **errp)
{
    const char *role = c->server ? "server" : "client";
    char cert_name[32], key_name[32];
    snprintf(cert_name, sizeof(cert_name), "%s-cert.pem", role);
    snprintf(key_name, sizeof(key_name), "%s-key.pem", role);
    /* A server always has its certificate; a client needs one only if the server asks. */
    char *ca = cred_path(c->dir, "ca-cert.pem", true, errp);
    char *cert = ca ? cred_path(c->dir, cert_name, c->server, errp) : NULL;
    char *key = cert ? cred_path(c->dir, key_name, true, errp) : NULL;
    char *crl = cred_path(c->dir, "ca-crl.pem", false, NULL);
    int r = 0, gr;
    if (!ca || (c->server && (!cert || !key)) || (cert && !key)) {
        r = -ENOENT;
    } else if ((gr = gnutls_certificate_allocate_credentials(&c->x509)) < 0) {
        r = gnutls_fail(errp, "Cannot allocate credentials for", c->dir, gr);
    } else if ((gr = gnutls_certificate_set_x509_trust_file(c->x509, ca,
                                                            GNUTLS_X509_FMT_PEM)) <= 0) {
        r = gr == 0 ? (vd_error_setg(errp, EINVAL, "No CA certificate in '%s'", ca), -EINVAL)
                    : gnutls_fail(errp, "Cannot load CA certificate", ca, gr);
    } else if (crl && (gr = gnutls_certificate_set_x509_crl_file(c->x509, crl,
                                                                 GNUTLS_X509_FMT_PEM)) < 0) {
        r = gnutls_fail(errp, "Cannot load CRL", crl, gr);
    } else if (cert && (gr = gnutls_certificate_set_x509_key_file(c->x509, cert, key,
                                                                  GNUTLS_X509_FMT_PEM)) < 0) {
        r = gnutls_fail(errp, "Cannot load certificate", cert, gr);
    } else if (c->server) {
        gnutls_certificate_set_known_dh_params(c->x509, GNUTLS_SEC_PARAM_MEDIUM);
    }
    free(ca);
    free(cert);
    free(key);
    free(crl);
    return r;
}

/* Does keys.psk hold a line "username:hexkey"? (A client's key must exist when it is added.) */
static int psk_has_user(const char *path, const char *username, VdError **errp)
{
    FILE *f = fopen(path, "re");
    if (!f) {
        int e = errno;
        vd_error_setg_errno(errp, e, "Unable to access credentials %s", path);
        return -e;
    }
    char line[1024];
    size_t ul = strlen(username);
    bool found = false;
    while (!found && fgets(line, sizeof(line), f)) {
        found = !strncmp(line, username, ul) && line[ul] == ':' && line[ul + 1] &&
                line[ul + 1] != '\n';
    }
    fclose(f);
    if (!found) {
        vd_error_setg(errp, ENOENT, "Username %s not found in PSK file %s", username, path);
        return -ENOENT;
    }
    return 0;
}

static int load_psk(VdTlsCreds *c, VdError **errp)
{
    char *path = cred_path(c->dir, "keys.psk", true, errp);
    if (!path) {
        return -ENOENT;
    }
    int r = 0, gr;
    if (!c->server) {
        r = psk_has_user(path, c->username, errp);
    } else if ((gr = gnutls_psk_allocate_server_credentials(&c->psk_srv)) < 0) {
        r = gnutls_fail(errp, "Cannot allocate credentials for", c->dir, gr);
    } else if ((gr = gnutls_psk_set_server_credentials_file(c->psk_srv, path)) < 0) {
        r = gnutls_fail(errp, "Cannot load PSK file", path, gr);
    } else {
        gnutls_psk_set_server_known_dh_params(c->psk_srv, GNUTLS_SEC_PARAM_MEDIUM);
    }
    free(path);
    return r;
}

int vd_tls_creds_add(const VdTlsCredsOptions *o, VdError **errp)
{
    VdTlsCreds *c = calloc(1, sizeof(*c));
    if (!c) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    c->obj.kind = OBJ_TLS_CREDS;
    c->psk = o->psk;
    c->server = o->server;
    c->verify_peer = o->verify_peer;
    c->obj.id = strdup(o->id);
    c->dir = strdup(o->dir ? o->dir : "");
    c->priority = o->priority ? strdup(o->priority) : NULL;
    c->username = strdup(o->username ? o->username : "qemu");
    int r;
    if (!c->obj.id || !c->dir || !c->username || (o->priority && !c->priority)) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        r = -ENOMEM;
    } else if (!o->dir) {
        /* QEMU's default dir is a build-time path; vdiskd has none, so a dir must be named. */
        vd_error_setg(errp, EINVAL, "Parameter 'dir' is missing: vdiskd has no default "
                      "credentials directory");
        r = -EINVAL;
    } else {
        r = c->psk ? load_psk(c, errp) : load_x509(c, errp);
    }
    if (r == 0) {
        r = obj_register(&c->obj, errp);
    }
    if (r < 0) {
        creds_free(c);
        free(c->obj.id);
        free(c);
    }
    return r;
}

VdTlsCreds *vd_tls_creds_get(const char *id, bool server, VdError **errp)
{
    VdTlsCreds *c = (VdTlsCreds *)obj_get(id, OBJ_TLS_CREDS);
    if (!c) {
        vd_error_setg(errp, ENOENT, "No TLS credentials with id '%s'", id);
        return NULL;
    }
    if (c->server != server) {
        vd_error_setg(errp, EINVAL, "Expected TLS credentials for a %s endpoint",
                      server ? "server" : "client");
        vd_tls_creds_unref(c);
        return NULL;
    }
    return c;
}

void vd_tls_creds_unref(VdTlsCreds *c)
{
    obj_unref(c ? &c->obj : NULL);
}

bool vd_tls_creds_is_psk(const VdTlsCreds *c)
{
    return c->psk;
}

bool vd_tls_creds_verify_peer(const VdTlsCreds *c)
{
    return c->verify_peer;
}

const char *vd_tls_creds_dir(const VdTlsCreds *c)
{
    return c->dir;
}

const char *vd_tls_creds_username(const VdTlsCreds *c)
{
    return c->username;
}

int vd_tls_creds_setup_session(const VdTlsCreds *c, gnutls_session_t s, VdError **errp)
{
    /* PSK key exchanges are not in NORMAL: add them, as QEMU does. */
    char prio[512];
    int n = snprintf(prio, sizeof(prio), "%s%s", c->priority ? c->priority : "NORMAL",
                     c->psk ? ":+ECDHE-PSK:+DHE-PSK:+PSK" : "");
    if (n < 0 || (size_t)n >= sizeof(prio)) {
        vd_error_setg(errp, EINVAL, "TLS priority string too long");
        return -EINVAL;
    }
    const char *bad = NULL;
    int gr = gnutls_priority_set_direct(s, prio, &bad);
    if (gr < 0) {
        vd_error_setg(errp, EINVAL, "Unable to set TLS session priority %s: %s", prio,
                      gnutls_strerror(gr));
        return -EINVAL;
    }
    gr = c->psk ? gnutls_credentials_set(s, GNUTLS_CRD_PSK, c->psk_srv)
                : gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, c->x509);
    if (gr < 0) {
        vd_error_setg(errp, EINVAL, "Cannot set session credentials: %s", gnutls_strerror(gr));
        return -EINVAL;
    }
    if (!c->psk && c->server) {
        gnutls_certificate_server_set_request(s, c->verify_peer ? GNUTLS_CERT_REQUIRE
                                                                : GNUTLS_CERT_IGNORE);
    }
    return 0;
}

/* ---- authorization ---- */

int vd_authz_simple_add(const char *id, const char *identity, VdError **errp)
{
    VdAuthz *a = calloc(1, sizeof(*a));
    if (a) {
        a->obj.kind = OBJ_AUTHZ;
        a->obj.id = strdup(id);
        a->identity = strdup(identity);
    }
    if (!a || !a->obj.id || !a->identity) {
        if (a) {
            free(a->obj.id);
            free(a->identity);
        }
        free(a);
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    int r = obj_register(&a->obj, errp);
    if (r < 0) {
        free(a->obj.id);
        free(a->identity);
        free(a);
    }
    return r;
}

VdAuthz *vd_authz_get(const char *id, VdError **errp)
{
    VdAuthz *a = (VdAuthz *)obj_get(id, OBJ_AUTHZ);
    if (!a) {
        vd_error_setg(errp, ENOENT, "No authorization object with id '%s'", id);
    }
    return a;
}

void vd_authz_unref(VdAuthz *a)
{
    obj_unref(a ? &a->obj : NULL);
}

bool vd_authz_is_allowed(const VdAuthz *a, const char *identity)
{
    return identity && !strcmp(a->identity, identity);
}
