/*
 * crypt-io.h - encrypted data I/O for formats (raw LUKS, qcow2 encrypt.format=luks): bytes of a
 * protocol node encrypted in 512-byte sectors whose IVs count from an IV origin that the format
 * chooses (the payload start for raw LUKS, offset 0 of the file for qcow2). Requests need no alignment:
 * partial sectors are read, decrypted, merged and re-encrypted (read-modify-write) under the
 * exclusive side of the lock, every other request holds its shared side, so two writes to one
 * sector never interleave.
 */
#ifndef VDISK_FORMATS_CRYPT_IO_H
#define VDISK_FORMATS_CRYPT_IO_H

#include <pthread.h>

#include "block/block.h"
#include "crypto/luks.h"

typedef struct VdCryptIO {
    VdLuks *luks; /* NULL: opened without its key (header only, e.g. qemu-img info) */
    pthread_rwlock_t lock;
} VdCryptIO;

/*
 * Open a LUKS header with the password in secret object key_secret (NULL: header only; then
 * no_io must be true, else QEMU's "Parameter '<param>' is required for cipher").
 */
int vd_crypt_open(VdCryptIO *c, VdLuksReadFn rd, void *opaque, const char *key_secret,
                  bool no_io, const char *param, VdError **errp);
/* A new LUKS header (unlocked) with the password in secret object key_secret. */
int vd_crypt_create(VdLuks **out, const VdLuksCreateOptions *o, const char *key_secret,
                    const char *param, VdError **errp);
/*
 * The bytes the LUKS header of vd_crypt_create(o, key_secret, param) would take (qemu-img
 * measure): the same refusals - no key_secret, no such secret object, options LUKS refuses.
 */
int vd_crypt_header_size(const VdLuksCreateOptions *o, const char *key_secret, const char *param,
                         uint64_t *len, VdError **errp);
void vd_crypt_close(VdCryptIO *c);
/*
 * Read / write bytes at host offset host of file, whose first byte has IV offset iv (host and iv
 * equal modulo 512). 0 or -errno (-EACCES without the key).
 */
int vd_crypt_pread(VdCryptIO *c, BlockNode *file, uint64_t host, uint64_t iv, uint64_t bytes,
                   void *buf);
int vd_crypt_pwrite(VdCryptIO *c, BlockNode *file, uint64_t host, uint64_t iv, uint64_t bytes,
                    const void *buf, int flags);

#endif
