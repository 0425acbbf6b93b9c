/*
 * luks.h - LUKS version 1 (the on-disk format cryptsetup and QEMU write): the header and its eight
 * key slots, unlocking the master key from a password, making a new header as QEMU does, and the
 * sector cipher that encrypts a payload. No I/O of its own: the caller passes read and write
 * callbacks for the header's bytes (a raw LUKS file from offset 0, or qcow2's encryption header
 * clusters). Sectors are 512 bytes; a sector's IV is its number counted from the payload start.
 */
#ifndef VDISK_CRYPTO_LUKS_H
#define VDISK_CRYPTO_LUKS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/error.h"

typedef struct json_t json_t; /* jansson */
typedef struct VdLuks VdLuks;

#define VD_LUKS_SECTOR_SIZE 512u

/* Read or write len bytes at offset of the header area: 0 or -errno. */
typedef int (*VdLuksReadFn)(void *opaque, uint64_t offset, void *buf, size_t len);
typedef int (*VdLuksWriteFn)(void *opaque, uint64_t offset, const void *buf, size_t len);

/* QEMU's QCryptoBlockCreateOptionsLUKS; NULL / 0 members take QEMU's defaults. */
typedef struct VdLuksCreateOptions {
    const char *cipher_alg;     /* aes-256 (default), aes-128/192, serpent-*, twofish-*, cast5-128 */
    const char *cipher_mode;    /* xts (default), cbc, ecb, ctr */
    const char *ivgen_alg;      /* plain64 (default), plain, essiv */
    const char *ivgen_hash_alg; /* essiv's hash (default sha256) */
    const char *hash_alg;       /* PBKDF2 and anti-forensic hash: sha256 (default), md5, sha1, ... */
    uint64_t iter_time;         /* milliseconds of PBKDF2 per key slot (default 2000) */
} VdLuksCreateOptions;

/*
 * Read and check the header. password NULL: header only (qemu-img info; no sector I/O);
 * else unlock a key slot with it, or fail with QEMU's "Invalid password, cannot unlock any
 * keyslot" (-EPERM). 0 with *out set, or -errno with *errp.
 */
int vd_luks_open(VdLuksReadFn rd, void *opaque, const char *password, size_t pwlen,
                 VdLuks **out, VdError **errp);
/*
 * A new header with a random master key, key slot 0 opened by password, in memory (unlocked);
 * vd_luks_write_header puts it on disk. 0 or -errno with *errp.
 */
int vd_luks_create(const VdLuksCreateOptions *o, const char *password, size_t pwlen,
                   VdLuks **out, VdError **errp);
/* Would vd_luks_create take these options? QEMU's refusals and messages; 0 or -errno. */
int vd_luks_check_options(const VdLuksCreateOptions *o, VdError **errp);
/* The bytes vd_luks_create's header would take with these options (qemu-img measure's). */
int vd_luks_header_size(const VdLuksCreateOptions *o, uint64_t *len, VdError **errp);
/* Write a created header and its key material at offsets 0 .. vd_luks_header_len(). */
int vd_luks_write_header(VdLuks *l, VdLuksWriteFn wr, void *opaque, VdError **errp);
/* The bytes the header and key slots take (= the payload offset of a raw LUKS image). */
uint64_t vd_luks_header_len(const VdLuks *l);
bool vd_luks_unlocked(const VdLuks *l);
/*
 * Encrypt / decrypt len bytes in place; offset (bytes from the payload start, which gives the
 * IVs) and len are multiples of VD_LUKS_SECTOR_SIZE. Thread-safe. 0 or -errno (-EACCES locked).
 */
int vd_luks_encrypt(const VdLuks *l, uint64_t offset, void *buf, size_t len);
int vd_luks_decrypt(const VdLuks *l, uint64_t offset, void *buf, size_t len);
/* QEMU's QCryptoBlockInfoLUKS members (qemu-img info's format-specific data); new reference. */
json_t *vd_luks_info(const VdLuks *l);
/* Frees l; the master key is wiped first. NULL is a no-op. */
void vd_luks_free(VdLuks *l);

#endif
