/*
 * tls-creds.c - the object registry behind object-add / object-del: TLS credentials (GnuTLS,
 * loaded when added), authorization lists (authz-simple, authz-list, authz-listfile) and secrets
 * (util/secret.c parses them; their bytes are wiped when the last reference goes).
 * Invariants: an id is in the registry at most once; an object is freed when its last reference
 * goes (the registry's, the NBD server's, a node's), so a user never sees its credentials change
 * or vanish. One mutex guards the list and the counts; an authz-listfile's own mutex guards its
 * rules, which are reloaded when the file changes (checked at each decision).
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/lock.h"
#include "util/log.h"
#include "util/secret.h"
#include "util/tls-creds.h"

typedef enum { OBJ_TLS_CREDS, OBJ_AUTHZ, OBJ_SECRET } ObjKind;

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

/* The state of an authz-listfile's file when its rules were read (a change means: reload). */
typedef struct FileStamp {
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtime, ctime;
} FileStamp;

struct VdAuthz {
    VdObject obj;
    char *identity;         /* authz-simple; NULL for the lists */
    VdAuthzList list;       /* authz-list; authz-listfile: the rules last read */
    bool list_ok;           /* authz-listfile: the last read succeeded (else: deny everyone) */
    char *filename;         /* authz-listfile, else NULL */
    bool refresh;           /* authz-listfile: reread when the file changes */
    FileStamp stamp;        /* authz-listfile: the file as last read */
    VdAuthzListParse parse; /* authz-listfile: the file's JSON into rules */
    pthread_mutex_t lock;   /* authz-listfile: list, list_ok, stamp */
};

typedef struct VdSecretObj {
    VdObject obj;
    uint8_t *data;
    size_t len;
} VdSecretObj;

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

void vd_authz_list_clear(VdAuthzList *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->rules[i].match);
    }
    free(l->rules);
    l->rules = NULL;
    l->n = 0;
}

static void authz_free(VdAuthz *a)
{
    free(a->identity);
    vd_authz_list_clear(&a->list);
    if (a->filename) {
        pthread_mutex_destroy(&a->lock);
    }
    free(a->filename);
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
    } else if (o->kind == OBJ_SECRET) {
        vd_secret_free(((VdSecretObj *)o)->data, ((VdSecretObj *)o)->len);
    } else {
        authz_free((VdAuthz *)o);
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

/* A new authz object of id, its members set by fill (which may fail), registered; 0 or -errno. */
static int authz_new(const char *id, VdAuthz **out, VdError **errp)
{
    VdAuthz *a = calloc(1, sizeof(*a));
    if (a) {
        a->obj.kind = OBJ_AUTHZ;
        a->obj.id = strdup(id);
    }
    if (!a || !a->obj.id) {
        free(a);
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    *out = a;
    return 0;
}

/* Register a, or free it (and its members) if that fails. */
static int authz_register(VdAuthz *a, int r, VdError **errp)
{
    if (r == 0) {
        r = obj_register(&a->obj, errp);
    }
    if (r < 0) {
        authz_free(a);
        free(a->obj.id);
        free(a);
    }
    return r;
}

int vd_authz_simple_add(const char *id, const char *identity, VdError **errp)
{
    VdAuthz *a;
    int r = authz_new(id, &a, errp);
    if (r < 0) {
        return r;
    }
    if (!(a->identity = strdup(identity))) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        r = -ENOMEM;
    }
    return authz_register(a, r, errp);
}

int vd_authz_list_add(const char *id, VdAuthzList *list, VdError **errp)
{
    VdAuthz *a;
    int r = authz_new(id, &a, errp);
    if (r < 0) {
        vd_authz_list_clear(list);
        return r;
    }
    a->list = *list;
    *list = (VdAuthzList){0};
    return authz_register(a, 0, errp);
}

static void stamp_of(const struct stat *st, FileStamp *f)
{
    *f = (FileStamp){.dev = st->st_dev, .ino = st->st_ino, .size = st->st_size,
                     .mtime = st->st_mtim, .ctime = st->st_ctim};
}

static bool stamp_equal(const FileStamp *a, const FileStamp *b)
{
    return a->dev == b->dev && a->ino == b->ino && a->size == b->size &&
           a->mtime.tv_sec == b->mtime.tv_sec && a->mtime.tv_nsec == b->mtime.tv_nsec &&
           a->ctime.tv_sec == b->ctime.tv_sec && a->ctime.tv_nsec == b->ctime.tv_nsec;
}

#define AUTHZ_FILE_MAX (1u << 20) /* an authz-listfile's size: rules, not a disk */

/* Read a->filename into a->list (QEMU's texts for an unreadable file); caller holds a->lock. */
static int listfile_load(VdAuthz *a, VdError **errp)
{
    FILE *f = fopen(a->filename, "re");
    struct stat st;
    if (!f || fstat(fileno(f), &st) < 0) {
        int e = errno;
        vd_error_setg(errp, e, "Unable to read '%s': Failed to open file \u201c%s\u201d: %s",
                      a->filename, a->filename, strerror(e));
        if (f) {
            fclose(f);
        }
        return -e;
    }
    size_t cap = (st.st_size > AUTHZ_FILE_MAX ? AUTHZ_FILE_MAX : (size_t)st.st_size) + 1, len = 0;
    char *text = malloc(cap);
    int r = text ? 0 : -ENOMEM;
    while (r == 0) {
        size_t n = fread(text + len, 1, cap - 1 - len, f);
        len += n;
        if (len < cap - 1 && n == 0) {
            break;
        }
        if (len == cap - 1 && cap > AUTHZ_FILE_MAX) {
            vd_error_setg(errp, EFBIG, "Unable to read '%s': larger than %u bytes", a->filename,
                          AUTHZ_FILE_MAX);
            r = -EFBIG;
        } else if (len == cap - 1) { /* the file grew while being read (or is not a regular file) */
            char *t = realloc(text, cap * 2);
            r = t ? 0 : -ENOMEM;
            text = t ? t : text;
            cap *= 2;
        }
    }
    int e = ferror(f) ? errno : 0;
    fclose(f);
    if (r == 0 && e) {
        vd_error_setg_errno(errp, e, "Unable to read '%s'", a->filename);
        r = -e;
    } else if (r == -ENOMEM) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
    }
    VdAuthzList list = {0};
    if (r == 0) {
        text[len] = 0;
        r = a->parse(text, a->filename, &list, errp);
    }
    free(text);
    vd_authz_list_clear(&a->list);
    a->list = list;
    a->list_ok = r == 0;
    stamp_of(&st, &a->stamp);
    return r;
}

int vd_authz_listfile_add(const char *id, const char *filename, bool refresh,
                          VdAuthzListParse parse, VdError **errp)
{
    VdAuthz *a;
    int r = authz_new(id, &a, errp);
    if (r < 0) {
        return r;
    }
    a->refresh = refresh;
    a->parse = parse;
    if (!(a->filename = strdup(filename))) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        free(a->obj.id);
        free(a);
        return -ENOMEM;
    }
    pthread_mutex_init(&a->lock, NULL);
    r = listfile_load(a, errp);
    if (r == 0 && refresh && filename[0] != '/') {
        vd_error_setg(errp, EINVAL, "Filename must be an absolute path");
        r = -EINVAL;
    }
    return authz_register(a, r, errp);
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

/* QEMU's glob (GLib's g_pattern_match_simple): '*' any run, '?' one character, nothing else. */
static bool glob_match(const char *p, const char *s)
{
    const char *star = NULL, *resume = NULL;
    while (*s) {
        if (*p == '*') {
            star = ++p;
            resume = s;
        } else if (*p && (*p == '?' || *p == *s)) {
            p++;
            s++;
        } else if (star) {
            p = star;
            s = ++resume;
        } else {
            return false;
        }
    }
    while (*p == '*') {
        p++;
    }
    return !*p;
}

/* QEMU's authz-list: the first rule that matches decides, else the list's policy. */
static bool list_allows(const VdAuthzList *l, const char *identity)
{
    for (size_t i = 0; i < l->n; i++) {
        const VdAuthzRule *r = &l->rules[i];
        if (r->glob ? glob_match(r->match, identity) : !strcmp(r->match, identity)) {
            return r->allow;
        }
    }
    return l->allow;
}

/* authz-listfile: reread the file if it changed since (refresh), then decide. */
static bool listfile_allows(VdAuthz *a, const char *identity)
{
    vd_mutex_lock(&a->lock);
    struct stat st;
    FileStamp now;
    /* A file removed keeps the rules last read, as QEMU's watch reacts to changes and creation. */
    if (a->refresh && stat(a->filename, &st) == 0 && (stamp_of(&st, &now),
                                                      !stamp_equal(&now, &a->stamp))) {
        VdError *err = NULL;
        if (listfile_load(a, &err) < 0) { /* QEMU then denies everyone until the next change */
            vd_log(VD_LOG_ERROR, "authz-listfile '%s': %s", a->obj.id, vd_error_msg(err));
            vd_error_free(err);
        }
    }
    bool ok = a->list_ok && list_allows(&a->list, identity);
    vd_mutex_unlock(&a->lock);
    return ok;
}

bool vd_authz_is_allowed(VdAuthz *a, const char *identity)
{
    if (!identity) {
        return false;
    }
    if (a->identity) {
        return !strcmp(a->identity, identity);
    }
    return a->filename ? listfile_allows(a, identity) : list_allows(&a->list, identity);
}

/* ---- secrets (the bytes; util/secret.c makes them from the object's options) ---- */

int vd_object_add_secret(const char *id, uint8_t *data, size_t len, VdError **errp)
{
    VdSecretObj *o = calloc(1, sizeof(*o));
    if (!o || !(o->obj.id = strdup(id))) {
        free(o);
        vd_secret_free(data, len);
        vd_error_setg(errp, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    o->obj.kind = OBJ_SECRET;
    o->data = data;
    o->len = len;
    int r = obj_register(&o->obj, errp);
    if (r < 0) {
        o->obj.refcnt = 1;
        obj_unref(&o->obj);
    }
    return r;
}

int vd_object_secret_copy(const char *id, uint8_t **data, size_t *len, VdError **errp)
{
    vd_mutex_lock(&reg_lock);
    VdObject *o = find_locked(id);
    if (!o || o->kind != OBJ_SECRET) {
        vd_mutex_unlock(&reg_lock);
        if (o) {
            vd_error_setg(errp, EINVAL, "Object '%s' is not a secret", id);
        } else {
            vd_error_setg(errp, ENOENT, "No secret with id '%s'", id);
        }
        return o ? -EINVAL : -ENOENT;
    }
    VdSecretObj *s = (VdSecretObj *)o;
    /* one byte more: a NUL after the secret, for callers that use it as a string */
    uint8_t *copy = malloc(s->len + 1);
    if (copy) {
        memcpy(copy, s->data, s->len);
        copy[s->len] = 0;
        *len = s->len;
    }
    vd_mutex_unlock(&reg_lock);
    if (!copy) {
        vd_error_setg(errp, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    *data = copy;
    return 0;
}
