/*
 * tls-creds.h - vdiskd's user-created objects, as QEMU's object-add makes them: TLS credentials
 * (tls-creds-x509, tls-creds-psk: a directory of PEM files / a keys.psk file, for one endpoint)
 * and authorization lists (authz-simple, authz-list, authz-listfile). Ids share one namespace.
 * Objects are reference counted: object-del drops the registry's reference, a user (the NBD
 * server, an NBD client node) keeps its own until it is done, as QOM does. Credentials are loaded (and checked) when added, so a
 * missing or broken file is reported by object-add, not by the first client. Thread-safe.
 */
#ifndef VDISK_UTIL_TLS_CREDS_H
#define VDISK_UTIL_TLS_CREDS_H

#include <stdbool.h>
#include <gnutls/gnutls.h>

#include "util/error.h"

typedef struct VdTlsCreds VdTlsCreds;
typedef struct VdAuthz VdAuthz;

typedef struct VdTlsCredsOptions {
    const char *id;
    bool psk;               /* tls-creds-psk, else tls-creds-x509 */
    const char *dir;        /* x509: ca-cert.pem, {server,client}-{cert,key}.pem; psk: keys.psk */
    bool server;            /* endpoint=server (QEMU's default is client) */
    bool verify_peer;       /* x509: server requires a client certificate; client checks the server's */
    const char *priority;   /* GnuTLS priority string; NULL = "NORMAL" */
    const char *username;   /* psk client: the identity (default "qemu") */
} VdTlsCredsOptions;

/* object-add: 0, or -errno with *errp set (-EEXIST for a taken id). */
int vd_tls_creds_add(const VdTlsCredsOptions *o, VdError **errp);
int vd_authz_simple_add(const char *id, const char *identity, VdError **errp);

/* authz-list's rules: the first whose match fits the identity decides, else the list's policy. */
typedef struct VdAuthzRule {
    char *match; /* owned */
    bool allow;  /* policy=allow, else deny */
    bool glob;   /* format=glob ('*' and '?'), else exact */
} VdAuthzRule;
typedef struct VdAuthzList {
    bool allow; /* the default policy */
    size_t n;
    VdAuthzRule *rules; /* owned */
} VdAuthzList;
void vd_authz_list_clear(VdAuthzList *l);
/* authz-list: takes list's rules (list is left empty, also on error). */
int vd_authz_list_add(const char *id, VdAuthzList *list, VdError **errp);
/* An authz-listfile's JSON text (a QAuthZList's members) into *out; 0 or -errno with *errp set. */
typedef int (*VdAuthzListParse)(const char *text, const char *filename, VdAuthzList *out,
                                VdError **errp);
/* authz-listfile: the rules are read now and, with refresh, again whenever the file changes. */
int vd_authz_listfile_add(const char *id, const char *filename, bool refresh,
                          VdAuthzListParse parse, VdError **errp);
/* object-del: drops the registry's reference; users keep theirs. -ENOENT if absent. */
int vd_object_del(const char *id, VdError **errp);

/*
 * The credentials named id, for the given endpoint (new reference), or NULL with QEMU's errors:
 * "No TLS credentials with id 'x'", "Expected TLS credentials for a server endpoint".
 */
VdTlsCreds *vd_tls_creds_get(const char *id, bool server, VdError **errp);
void vd_tls_creds_unref(VdTlsCreds *c);
bool vd_tls_creds_is_psk(const VdTlsCreds *c);
bool vd_tls_creds_verify_peer(const VdTlsCreds *c);
const char *vd_tls_creds_dir(const VdTlsCreds *c);
const char *vd_tls_creds_username(const VdTlsCreds *c); /* psk client */
/* A server session's configuration: priority and credentials set on s. 0 or -errno. */
int vd_tls_creds_setup_session(const VdTlsCreds *c, gnutls_session_t s, VdError **errp);

VdAuthz *vd_authz_get(const char *id, VdError **errp); /* new reference */
void vd_authz_unref(VdAuthz *a);
bool vd_authz_is_allowed(VdAuthz *a, const char *identity);

#endif
