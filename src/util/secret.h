/*
 * secret.h - QEMU's `secret` objects (--object secret,id=ID,data=...|file=PATH[,format=raw|base64],
 * QMP object-add qom-type secret): passwords and keys kept by id in the object registry
 * (util/tls-creds.h's, so ids share one namespace and object-del drops them). A secret's bytes
 * are copied out for each use and every copy is wiped before it is freed (vd_secret_free).
 */
#ifndef VDISK_UTIL_SECRET_H
#define VDISK_UTIL_SECRET_H

#include <stddef.h>
#include <stdint.h>

#include "util/error.h"

typedef struct VdSecretOptions {
    const char *id;
    const char *data;   /* the secret itself, or: */
    const char *file;   /* a file holding it (read whole, as QEMU: no newline stripped) */
    const char *format; /* "raw" (default) or "base64" (data/file hold base64 of the bytes) */
    const char *keyid;  /* QEMU's secrets encrypted with another secret: refused */
    const char *iv;
} VdSecretOptions;

/* Add a secret object: 0, or -errno with QEMU's message (-EEXIST for a taken id). */
int vd_secret_add(const VdSecretOptions *o, VdError **errp);
/*
 * Add one from a --object argument's text after "secret," ("id=s0,data=x", ",," escapes a comma).
 */
int vd_secret_add_keyval(const char *args, VdError **errp);
/*
 * A NUL-terminated copy of secret id's bytes, which must be valid UTF-8 (a password, QEMU's
 * qcrypto_secret_lookup_as_utf8); *len without the NUL. Free with vd_secret_free(*out, *len).
 */
int vd_secret_lookup_utf8(const char *id, char **out, size_t *len, VdError **errp);
/* Overwrite len bytes with zeroes, then free (any buffer that held a key). NULL is a no-op. */
void vd_secret_free(void *p, size_t len);

/* The registry's side (tls-creds.c): takes ownership of data (wiped on failure). */
int vd_object_add_secret(const char *id, uint8_t *data, size_t len, VdError **errp);
int vd_object_secret_copy(const char *id, uint8_t **data, size_t *len, VdError **errp);

#endif
