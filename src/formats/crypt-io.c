/*
 * crypt-io.c - sector-encrypted byte I/O for the encrypted formats (see crypt-io.h): bounce
 * buffers of at most CRYPT_CHUNK bytes, ciphertext never handed back to a caller, plaintext never
 * written to the file. Unaligned writes take the lock exclusively for their read-modify-write.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "formats/crypt-io.h"
#include "util/lock.h"
#include "util/secret.h"

#define SECTOR VD_LUKS_SECTOR_SIZE
#define CRYPT_CHUNK (1u << 20)

int vd_crypt_open(VdCryptIO *c, VdLuksReadFn rd, void *opaque, const char *key_secret,
                  bool no_io, const char *param, VdError **errp)
{
    char *pw = NULL;
    size_t len = 0;
    if (!key_secret && !no_io) {
        vd_error_setg(errp, EINVAL, "Parameter '%s' is required for cipher", param);
        return -EINVAL;
    }
    if (key_secret) {
        int r = vd_secret_lookup_utf8(key_secret, &pw, &len, errp);
        if (r < 0) {
            return r;
        }
    }
    int r = vd_luks_open(rd, opaque, pw, len, &c->luks, errp);
    vd_secret_free(pw, len);
    if (r < 0) {
        return r;
    }
    pthread_rwlock_init(&c->lock, NULL);
    return 0;
}

int vd_crypt_create(VdLuks **out, const VdLuksCreateOptions *o, const char *key_secret,
                    const char *param, VdError **errp)
{
    char *pw = NULL;
    size_t len = 0;
    if (!key_secret) {
        vd_error_setg(errp, EINVAL, "Parameter '%s' is required for cipher", param);
        return -EINVAL;
    }
    int r = vd_secret_lookup_utf8(key_secret, &pw, &len, errp);
    if (r == 0) {
        r = vd_luks_create(o, pw, len, out, errp);
    }
    vd_secret_free(pw, len);
    return r;
}

int vd_crypt_header_size(const VdLuksCreateOptions *o, const char *key_secret, const char *param,
                         uint64_t *len, VdError **errp)
{
    char *pw = NULL;
    size_t pwlen = 0;
    if (!key_secret) {
        vd_error_setg(errp, EINVAL, "Parameter '%s' is required for cipher", param);
        return -EINVAL;
    }
    int r = vd_secret_lookup_utf8(key_secret, &pw, &pwlen, errp);
    vd_secret_free(pw, pwlen);
    return r < 0 ? r : vd_luks_header_size(o, len, errp);
}

void vd_crypt_close(VdCryptIO *c)
{
    if (c->luks) {
        vd_luks_free(c->luks);
        c->luks = NULL;
        pthread_rwlock_destroy(&c->lock);
    }
}

/* Whole sectors [host, host+bytes) decrypted into buf (all aligned, bytes <= CRYPT_CHUNK). */
static int read_sectors(VdCryptIO *c, BlockNode *file, uint64_t host, uint64_t iv,
                        uint64_t bytes, uint8_t *buf)
{
    int r = vd_pread(file, host, bytes, buf);
    return r < 0 ? r : vd_luks_decrypt(c->luks, iv, buf, bytes);
}

int vd_crypt_pread(VdCryptIO *c, BlockNode *file, uint64_t host, uint64_t iv, uint64_t bytes,
                   void *buf)
{
    if (!c->luks || !vd_luks_unlocked(c->luks)) {
        return -EACCES;
    }
    uint8_t *bounce = malloc(CRYPT_CHUNK);
    if (!bounce) {
        return -ENOMEM;
    }
    int r = 0;
    vd_rwlock_rdlock(&c->lock);
    while (r == 0 && bytes > 0) {
        uint64_t head = iv % SECTOR;
        uint64_t n = CRYPT_CHUNK - head < bytes ? CRYPT_CHUNK - head : bytes;
        uint64_t span = (head + n + SECTOR - 1) / SECTOR * SECTOR;
        r = read_sectors(c, file, host - head, iv - head, span, bounce);
        if (r == 0) {
            memcpy(buf, bounce + head, n);
        }
        host += n;
        iv += n;
        buf = (uint8_t *)buf + n;
        bytes -= n;
    }
    vd_rwlock_unlock(&c->lock);
    explicit_bzero(bounce, CRYPT_CHUNK);
    free(bounce);
    return r;
}

/* One chunk: partial edge sectors are merged with what the file holds (lock held exclusively). */
static int write_chunk(VdCryptIO *c, BlockNode *file, uint64_t host, uint64_t iv, uint64_t n,
                       const uint8_t *src, uint8_t *bounce, int flags)
{
    uint64_t head = iv % SECTOR;
    uint64_t span = (head + n + SECTOR - 1) / SECTOR * SECTOR;
    int r = 0;
    if (head) {
        r = read_sectors(c, file, host - head, iv - head, SECTOR, bounce);
    }
    if (r == 0 && (head + n) % SECTOR && (span > SECTOR || !head)) {
        r = read_sectors(c, file, host - head + span - SECTOR, iv - head + span - SECTOR,
                         SECTOR, bounce + span - SECTOR);
    }
    if (r == 0) {
        memcpy(bounce + head, src, n);
        r = vd_luks_encrypt(c->luks, iv - head, bounce, span);
    }
    return r < 0 ? r : vd_pwrite(file, host - head, span, bounce, flags);
}

int vd_crypt_pwrite(VdCryptIO *c, BlockNode *file, uint64_t host, uint64_t iv, uint64_t bytes,
                    const void *buf, int flags)
{
    if (!c->luks || !vd_luks_unlocked(c->luks)) {
        return -EACCES;
    }
    uint8_t *bounce = malloc(CRYPT_CHUNK);
    if (!bounce) {
        return -ENOMEM;
    }
    bool unaligned = iv % SECTOR || bytes % SECTOR;
    if (unaligned) {
        vd_rwlock_wrlock(&c->lock);
    } else {
        vd_rwlock_rdlock(&c->lock);
    }
    int r = 0;
    const uint8_t *src = buf;
    while (r == 0 && bytes > 0) {
        uint64_t head = iv % SECTOR;
        uint64_t n = CRYPT_CHUNK - head < bytes ? CRYPT_CHUNK - head : bytes;
        r = write_chunk(c, file, host, iv, n, src, bounce, flags);
        host += n;
        iv += n;
        src += n;
        bytes -= n;
    }
    vd_rwlock_unlock(&c->lock);
    explicit_bzero(bounce, CRYPT_CHUNK);
    free(bounce);
    return r;
}
