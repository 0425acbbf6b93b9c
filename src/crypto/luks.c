/*
 * luks.c - LUKS1 headers, key slots and sector encryption on GnuTLS (PBKDF2, hashes, AES-XTS and
 * AES-CBC; no primitive is written here). Invariants: a VdLuks is immutable once opened or created
 * (sector calls share it between threads; each call makes its own cipher handles), and every
 * buffer that held a key (master key, slot keys, split key material, passwords) is wiped before
 * it is freed. Layout of new headers follows QEMU's crypto/block-luks.c: 4 KiB for the header,
 * then eight 4 KiB-aligned key-material areas, then the payload.
 */
#include <endian.h>
#include <errno.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "crypto/luks.h"
#include "util/secret.h"

#define LUKS_MAGIC "LUKS\xba\xbe"
#define LUKS_MAGIC_LEN 6
#define LUKS_HDR_SIZE 592
#define LUKS_NUM_SLOTS 8
#define LUKS_SALT_LEN 32
#define LUKS_DIGEST_LEN 20
#define LUKS_STRIPES 4000
#define LUKS_SLOT_ENABLED 0x00AC71F3u
#define LUKS_SLOT_DISABLED 0x0000DEADu
#define LUKS_NAME_LEN 32
#define LUKS_UUID_LEN 40
#define LUKS_SLOT_AREA_OFFSET 4096u /* QEMU: key material starts after 4 KiB of header */
#define LUKS_SLOT_ALIGN 4096u       /* ... and each slot's area is 4 KiB aligned */
#define LUKS_MIN_ITERS 1000u        /* QEMU's minimum for slot and master key digests */
#define LUKS_MAX_KEY 64u
#define AES_BLOCK 16u

enum { IV_PLAIN, IV_PLAIN64, IV_ESSIV };

/* The sector cipher a header names (payload and key material use the same one). */
typedef struct LuksAlg {
    gnutls_cipher_algorithm_t cipher;
    size_t key_len;
    int key_bits;  /* AES key size in bits ("aes-256"); xts keys are two of them */
    bool xts;
    int ivgen;
    gnutls_digest_algorithm_t ivhash; /* essiv */
    const char *ivhash_name;
    gnutls_cipher_algorithm_t essiv_cipher; /* AES-CBC with the hash's length as key */
} LuksAlg;

typedef struct LuksSlot {
    uint32_t active, iters, key_offset, stripes;
    uint8_t salt[LUKS_SALT_LEN];
} LuksSlot;

struct VdLuks {
    char cipher_name[LUKS_NAME_LEN + 1], cipher_mode[LUKS_NAME_LEN + 1];
    char hash_spec[LUKS_NAME_LEN + 1], uuid[LUKS_UUID_LEN + 1];
    uint32_t payload_offset; /* sectors */
    uint32_t key_bytes, mk_iters;
    uint8_t mk_digest[LUKS_DIGEST_LEN], mk_salt[LUKS_SALT_LEN];
    LuksSlot slots[LUKS_NUM_SLOTS];
    LuksAlg alg;
    gnutls_digest_algorithm_t hash; /* PBKDF2 and AF hash */
    gnutls_mac_algorithm_t mac;
    uint8_t *master_key;            /* NULL while locked */
    uint8_t essiv_key[64];          /* essiv: H(master key) */
    uint8_t *material;              /* created, not yet written: slot 0's encrypted split key */
    size_t material_len;
};

/* ---- names ---- */

typedef struct HashName {
    const char *name;
    gnutls_digest_algorithm_t dig;
    gnutls_mac_algorithm_t mac;
} HashName;

static const HashName hashes[] = {
    {"sha1", GNUTLS_DIG_SHA1, GNUTLS_MAC_SHA1},
    {"sha224", GNUTLS_DIG_SHA224, GNUTLS_MAC_SHA224},
    {"sha256", GNUTLS_DIG_SHA256, GNUTLS_MAC_SHA256},
    {"sha384", GNUTLS_DIG_SHA384, GNUTLS_MAC_SHA384},
    {"sha512", GNUTLS_DIG_SHA512, GNUTLS_MAC_SHA512},
    {"ripemd160", GNUTLS_DIG_RMD160, GNUTLS_MAC_RMD160},
    {NULL, 0, 0}};

static const HashName *hash_by_name(const char *name)
{
    for (const HashName *h = hashes; h->name; h++) {
        if (!strcmp(h->name, name)) {
            return h;
        }
    }
    return NULL;
}

static gnutls_cipher_algorithm_t aes_cbc(size_t key_len)
{
    return key_len == 16 ? GNUTLS_CIPHER_AES_128_CBC : key_len == 24 ? GNUTLS_CIPHER_AES_192_CBC
         : key_len == 32 ? GNUTLS_CIPHER_AES_256_CBC : GNUTLS_CIPHER_UNKNOWN;
}

/*
 * The sector cipher for cipher name "aes", a mode "xts-plain64" / "cbc-essiv:sha256" / ... and a
 * key length in bytes (xts: two AES keys).
 */
static int alg_setup(LuksAlg *a, const char *cipher, const char *mode, size_t key_len,
                     VdError **errp)
{
    memset(a, 0, sizeof(*a));
    char chain[LUKS_NAME_LEN + 1], ivgen[LUKS_NAME_LEN + 1] = "";
    snprintf(chain, sizeof(chain), "%s", mode);
    char *dash = strchr(chain, '-');
    if (dash) {
        *dash = 0;
        snprintf(ivgen, sizeof(ivgen), "%s", dash + 1);
    }
    char *colon = strchr(ivgen, ':');
    const char *ivhash = NULL;
    if (colon) {
        *colon = 0;
        ivhash = colon + 1;
    }
    if (strcmp(cipher, "aes") != 0) {
        vd_error_setg(errp, ENOTSUP, "Cipher name '%s' is not supported", cipher);
        return -ENOTSUP;
    }
    a->xts = !strcmp(chain, "xts");
    if (!a->xts && strcmp(chain, "cbc") != 0) {
        vd_error_setg(errp, ENOTSUP, "Cipher mode '%s' is not supported", chain);
        return -ENOTSUP;
    }
    a->key_len = key_len;
    a->key_bits = (int)(a->xts ? key_len * 4 : key_len * 8);
    a->cipher = a->xts ? (key_len == 32 ? GNUTLS_CIPHER_AES_128_XTS
                          : key_len == 64 ? GNUTLS_CIPHER_AES_256_XTS : GNUTLS_CIPHER_UNKNOWN)
                       : aes_cbc(key_len);
    if (a->cipher == GNUTLS_CIPHER_UNKNOWN) {
        vd_error_setg(errp, ENOTSUP, "Cipher aes with key size %zu bytes in %s mode is not "
                      "supported", key_len, chain);
        return -ENOTSUP;
    }
    if (!strcmp(ivgen, "plain64")) {
        a->ivgen = IV_PLAIN64;
    } else if (!strcmp(ivgen, "plain")) {
        a->ivgen = IV_PLAIN;
    } else if (!strcmp(ivgen, "essiv")) {
        const HashName *h = ivhash ? hash_by_name(ivhash) : NULL;
        if (!h) {
            vd_error_setg(errp, ENOTSUP, "Hash '%s' is not supported", ivhash ? ivhash : "");
            return -ENOTSUP;
        }
        a->ivgen = IV_ESSIV;
        a->ivhash = h->dig;
        a->ivhash_name = h->name;
        a->essiv_cipher = aes_cbc(gnutls_hash_get_len(h->dig));
        if (a->essiv_cipher == GNUTLS_CIPHER_UNKNOWN) {
            vd_error_setg(errp, ENOTSUP, "Hash '%s' cannot key an ESSIV cipher", ivhash);
            return -ENOTSUP;
        }
    } else {
        vd_error_setg(errp, ENOTSUP, "IV generator '%s' is not supported", ivgen);
        return -ENOTSUP;
    }
    return 0;
}

/* ---- the sector cipher ---- */

/*
 * Encrypt or decrypt len bytes (whole sectors) in place with key; the first sector is number
 * first_sector. ESSIV's IV key is H(key), given as essiv_key.
 */
static int sectors_crypt(const LuksAlg *a, const uint8_t *key, const uint8_t *essiv_key,
                         uint64_t first_sector, uint8_t *buf, size_t len, bool enc)
{
    gnutls_cipher_hd_t h = NULL, ivh = NULL;
    uint8_t iv[AES_BLOCK] = {0};
    gnutls_datum_t k = {(unsigned char *)key, (unsigned int)a->key_len};
    gnutls_datum_t ivd = {iv, AES_BLOCK};
    int r = gnutls_cipher_init(&h, a->cipher, &k, &ivd);
    if (r == 0 && a->ivgen == IV_ESSIV) {
        gnutls_datum_t ek = {(unsigned char *)essiv_key,
                             (unsigned int)gnutls_hash_get_len(a->ivhash)};
        r = gnutls_cipher_init(&ivh, a->essiv_cipher, &ek, &ivd);
    }
    for (size_t done = 0; r == 0 && done < len; done += VD_LUKS_SECTOR_SIZE) {
        uint64_t sector = first_sector + done / VD_LUKS_SECTOR_SIZE;
        memset(iv, 0, sizeof(iv));
        if (a->ivgen == IV_PLAIN) {
            uint32_t le = htole32((uint32_t)sector);
            memcpy(iv, &le, sizeof(le));
        } else {
            uint64_t le = htole64(sector);
            memcpy(iv, &le, sizeof(le));
        }
        if (a->ivgen == IV_ESSIV) {
            /* one CBC block under a zero IV is the ECB encryption ESSIV asks for */
            uint8_t zero[AES_BLOCK] = {0};
            gnutls_cipher_set_iv(ivh, zero, AES_BLOCK);
            r = gnutls_cipher_encrypt(ivh, iv, AES_BLOCK);
        }
        if (r == 0) {
            gnutls_cipher_set_iv(h, iv, AES_BLOCK);
            r = enc ? gnutls_cipher_encrypt(h, buf + done, VD_LUKS_SECTOR_SIZE)
                    : gnutls_cipher_decrypt(h, buf + done, VD_LUKS_SECTOR_SIZE);
        }
    }
    if (ivh) {
        gnutls_cipher_deinit(ivh);
    }
    if (h) {
        gnutls_cipher_deinit(h);
    }
    explicit_bzero(iv, sizeof(iv));
    return r == 0 ? 0 : -EIO;
}

/* ESSIV's key for a sector key: its hash. */
static int essiv_key_of(const LuksAlg *a, const uint8_t *key, uint8_t *out)
{
    if (a->ivgen != IV_ESSIV) {
        return 0;
    }
    return gnutls_hash_fast(a->ivhash, key, a->key_len, out) == 0 ? 0 : -EIO;
}

static int crypt_checked(const VdLuks *l, uint64_t offset, void *buf, size_t len, bool enc)
{
    if (!l->master_key) {
        return -EACCES;
    }
    if (offset % VD_LUKS_SECTOR_SIZE || len % VD_LUKS_SECTOR_SIZE) {
        return -EINVAL;
    }
    return sectors_crypt(&l->alg, l->master_key, l->essiv_key, offset / VD_LUKS_SECTOR_SIZE,
                         buf, len, enc);
}

int vd_luks_encrypt(const VdLuks *l, uint64_t offset, void *buf, size_t len)
{
    return crypt_checked(l, offset, buf, len, true);
}

int vd_luks_decrypt(const VdLuks *l, uint64_t offset, void *buf, size_t len)
{
    return crypt_checked(l, offset, buf, len, false);
}

/* ---- anti-forensic split and merge (LUKS1's AFsplitter, stripes of key_len bytes) ---- */

/* Diffuse a block: each digest-sized piece i becomes H(be32(i) || piece), cut to the piece's size. */
static int af_diffuse(gnutls_digest_algorithm_t dig, uint8_t *block, size_t len)
{
    size_t dlen = gnutls_hash_get_len(dig);
    uint8_t out[64];
    for (size_t i = 0; i * dlen < len; i++) {
        size_t n = len - i * dlen < dlen ? len - i * dlen : dlen;
        uint32_t be = htobe32((uint32_t)i);
        gnutls_hash_hd_t h;
        if (gnutls_hash_init(&h, dig) < 0) {
            return -EIO;
        }
        gnutls_hash(h, &be, sizeof(be));
        gnutls_hash(h, block + i * dlen, n);
        gnutls_hash_deinit(h, out);
        memcpy(block + i * dlen, out, n);
    }
    explicit_bzero(out, sizeof(out));
    return 0;
}

static void xor_into(uint8_t *dst, const uint8_t *src, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        dst[i] ^= src[i];
    }
}

/*
 * Merge (split == false: key from the stripes) or split (key into stripes, all but the last
 * random). d is the key_len-byte running block.
 */
static int af_run(gnutls_digest_algorithm_t dig, uint8_t *stripes, uint32_t n, uint8_t *key,
                  size_t key_len, bool split)
{
    uint8_t d[LUKS_MAX_KEY] = {0};
    int r = 0;
    for (uint32_t i = 0; r == 0 && i + 1 < n; i++) {
        uint8_t *s = stripes + (size_t)i * key_len;
        if (split && gnutls_rnd(GNUTLS_RND_RANDOM, s, key_len) < 0) {
            r = -EIO;
            break;
        }
        xor_into(d, s, key_len);
        r = af_diffuse(dig, d, key_len);
    }
    uint8_t *last = stripes + (size_t)(n - 1) * key_len;
    if (r == 0 && split) {
        memcpy(last, d, key_len);
        xor_into(last, key, key_len);
    } else if (r == 0) {
        memcpy(key, d, key_len);
        xor_into(key, last, key_len);
    }
    explicit_bzero(d, sizeof(d));
    return r;
}

/* ---- header (de)serialisation: big-endian, LUKS1 layout ---- */

static size_t material_len(const VdLuks *l, uint32_t stripes)
{
    size_t n = (size_t)l->key_bytes * stripes;
    return (n + VD_LUKS_SECTOR_SIZE - 1) / VD_LUKS_SECTOR_SIZE * VD_LUKS_SECTOR_SIZE;
}

static uint32_t get32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return be32toh(v);
}

static void put32(uint8_t *p, uint32_t v)
{
    v = htobe32(v);
    memcpy(p, &v, 4);
}

static void get_name(char *dst, const uint8_t *src, size_t len)
{
    memcpy(dst, src, len);
    dst[len] = 0;
}

static void parse_header(VdLuks *l, const uint8_t *h)
{
    get_name(l->cipher_name, h + 8, LUKS_NAME_LEN);
    get_name(l->cipher_mode, h + 40, LUKS_NAME_LEN);
    get_name(l->hash_spec, h + 72, LUKS_NAME_LEN);
    l->payload_offset = get32(h + 104);
    l->key_bytes = get32(h + 108);
    memcpy(l->mk_digest, h + 112, LUKS_DIGEST_LEN);
    memcpy(l->mk_salt, h + 132, LUKS_SALT_LEN);
    l->mk_iters = get32(h + 164);
    get_name(l->uuid, h + 168, LUKS_UUID_LEN);
    for (int i = 0; i < LUKS_NUM_SLOTS; i++) {
        const uint8_t *s = h + 208 + i * 48;
        l->slots[i].active = get32(s);
        l->slots[i].iters = get32(s + 4);
        memcpy(l->slots[i].salt, s + 8, LUKS_SALT_LEN);
        l->slots[i].key_offset = get32(s + 40);
        l->slots[i].stripes = get32(s + 44);
    }
}

static void format_header(const VdLuks *l, uint8_t *h)
{
    memset(h, 0, LUKS_HDR_SIZE);
    memcpy(h, LUKS_MAGIC, LUKS_MAGIC_LEN);
    h[7] = 1; /* version, big-endian */
    memcpy(h + 8, l->cipher_name, strlen(l->cipher_name));
    memcpy(h + 40, l->cipher_mode, strlen(l->cipher_mode));
    memcpy(h + 72, l->hash_spec, strlen(l->hash_spec));
    put32(h + 104, l->payload_offset);
    put32(h + 108, l->key_bytes);
    memcpy(h + 112, l->mk_digest, LUKS_DIGEST_LEN);
    memcpy(h + 132, l->mk_salt, LUKS_SALT_LEN);
    put32(h + 164, l->mk_iters);
    memcpy(h + 168, l->uuid, strlen(l->uuid));
    for (int i = 0; i < LUKS_NUM_SLOTS; i++) {
        uint8_t *s = h + 208 + i * 48;
        put32(s, l->slots[i].active);
        put32(s + 4, l->slots[i].iters);
        memcpy(s + 8, l->slots[i].salt, LUKS_SALT_LEN);
        put32(s + 40, l->slots[i].key_offset);
        put32(s + 44, l->slots[i].stripes);
    }
}

/* QEMU's header checks (crypto/block-luks.c), with its messages. */
static int check_header(VdLuks *l, const uint8_t *h, VdError **errp)
{
    if (memcmp(h, LUKS_MAGIC, LUKS_MAGIC_LEN) != 0) {
        vd_error_setg(errp, EINVAL, "Volume is not in LUKS format");
        return -EINVAL;
    }
    uint16_t version = (uint16_t)(h[6] << 8 | h[7]);
    if (version != 1) {
        vd_error_setg(errp, ENOTSUP, "LUKS version %u is not supported", version);
        return -ENOTSUP;
    }
    parse_header(l, h);
    const HashName *hn = hash_by_name(l->hash_spec);
    if (!hn) {
        vd_error_setg(errp, ENOTSUP, "Hash '%s' is not supported", l->hash_spec);
        return -ENOTSUP;
    }
    l->hash = hn->dig;
    l->mac = hn->mac;
    if (l->key_bytes == 0 || l->key_bytes > LUKS_MAX_KEY) {
        vd_error_setg(errp, EINVAL, "LUKS key size %u is invalid", l->key_bytes);
        return -EINVAL;
    }
    int r = alg_setup(&l->alg, l->cipher_name, l->cipher_mode, l->key_bytes, errp);
    if (r < 0) {
        return r;
    }
    uint64_t hdr_sectors = (LUKS_HDR_SIZE + VD_LUKS_SECTOR_SIZE - 1) / VD_LUKS_SECTOR_SIZE;
    for (int i = 0; i < LUKS_NUM_SLOTS; i++) {
        const LuksSlot *s = &l->slots[i];
        if (s->active != LUKS_SLOT_ENABLED && s->active != LUKS_SLOT_DISABLED) {
            vd_error_setg(errp, EINVAL, "Keyslot %d state (active/disable) is corrupted", i);
            return -EINVAL;
        }
        if (s->stripes != LUKS_STRIPES) {
            vd_error_setg(errp, EINVAL, "Keyslot %d is corrupted (stripes %u != %u)", i,
                          s->stripes, LUKS_STRIPES);
            return -EINVAL;
        }
        uint64_t start = s->key_offset;
        uint64_t end = start + material_len(l, s->stripes) / VD_LUKS_SECTOR_SIZE;
        if (start < hdr_sectors) {
            vd_error_setg(errp, EINVAL, "Keyslot %d is overlapping with the LUKS header", i);
            return -EINVAL;
        }
        if (l->payload_offset && end > l->payload_offset) {
            vd_error_setg(errp, EINVAL, "Keyslot %d is overlapping with the encrypted payload",
                          i);
            return -EINVAL;
        }
        for (int j = i + 1; j < LUKS_NUM_SLOTS; j++) {
            uint64_t s2 = l->slots[j].key_offset;
            uint64_t e2 = s2 + material_len(l, l->slots[j].stripes) / VD_LUKS_SECTOR_SIZE;
            if (start < e2 && s2 < end) {
                vd_error_setg(errp, EINVAL, "Keyslots %d and %d are overlapping in the header",
                              i, j);
                return -EINVAL;
            }
        }
    }
    return 0;
}

/* ---- unlocking ---- */

static int pbkdf2(gnutls_mac_algorithm_t mac, const void *pw, size_t pwlen, const uint8_t *salt,
                  uint32_t iters, uint8_t *out, size_t outlen)
{
    gnutls_datum_t key = {(unsigned char *)pw, (unsigned int)pwlen};
    gnutls_datum_t s = {(unsigned char *)salt, LUKS_SALT_LEN};
    return gnutls_pbkdf2(mac, &key, &s, iters, out, outlen) == 0 ? 0 : -EIO;
}

/* Does key open the header (its PBKDF2 digest is the master key digest)? */
static bool master_key_matches(const VdLuks *l, const uint8_t *key)
{
    uint8_t digest[LUKS_DIGEST_LEN];
    bool ok = pbkdf2(l->mac, key, l->key_bytes, l->mk_salt, l->mk_iters, digest,
                     sizeof(digest)) == 0 &&
              gnutls_memcmp(digest, l->mk_digest, sizeof(digest)) == 0;
    explicit_bzero(digest, sizeof(digest));
    return ok;
}

/* Try one active slot: 1 when it yields the master key (into key), 0 when not, or -errno. */
static int try_slot(const VdLuks *l, const LuksSlot *s, VdLuksReadFn rd, void *opaque,
                    const char *pw, size_t pwlen, uint8_t *key)
{
    size_t mlen = material_len(l, s->stripes);
    uint8_t *m = malloc(mlen);
    uint8_t slot_key[LUKS_MAX_KEY], essiv[64];
    if (!m) {
        return -ENOMEM;
    }
    int r = rd(opaque, (uint64_t)s->key_offset * VD_LUKS_SECTOR_SIZE, m, mlen);
    if (r == 0 && s->iters == 0) {
        r = -EINVAL;
    }
    if (r == 0) {
        r = pbkdf2(l->mac, pw, pwlen, s->salt, s->iters, slot_key, l->key_bytes);
    }
    if (r == 0) {
        r = essiv_key_of(&l->alg, slot_key, essiv);
    }
    if (r == 0) {
        r = sectors_crypt(&l->alg, slot_key, essiv, 0, m, mlen, false);
    }
    if (r == 0) {
        r = af_run(l->hash, m, s->stripes, key, l->key_bytes, false);
    }
    if (r == 0) {
        r = master_key_matches(l, key) ? 1 : 0;
    }
    explicit_bzero(slot_key, sizeof(slot_key));
    explicit_bzero(essiv, sizeof(essiv));
    vd_secret_free(m, mlen);
    return r;
}

static VdLuks *luks_new(void)
{
    return calloc(1, sizeof(VdLuks));
}

/* The master key becomes l's (ESSIV key derived). */
static int set_master_key(VdLuks *l, uint8_t *key)
{
    l->master_key = key;
    return essiv_key_of(&l->alg, key, l->essiv_key);
}

int vd_luks_open(VdLuksReadFn rd, void *opaque, const char *password, size_t pwlen,
                 VdLuks **out, VdError **errp)
{
    uint8_t h[LUKS_HDR_SIZE];
    int r = rd(opaque, 0, h, sizeof(h));
    if (r < 0) {
        vd_error_setg_errno(errp, -r, "Unable to read LUKS header");
        return r;
    }
    VdLuks *l = luks_new();
    if (!l) {
        vd_error_setg(errp, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    if ((r = check_header(l, h, errp)) < 0) {
        vd_luks_free(l);
        return r;
    }
    if (password) {
        uint8_t *key = malloc(l->key_bytes);
        r = key ? 0 : -ENOMEM;
        for (int i = 0; r == 0 && i < LUKS_NUM_SLOTS; i++) {
            if (l->slots[i].active == LUKS_SLOT_ENABLED) {
                r = try_slot(l, &l->slots[i], rd, opaque, password, pwlen, key);
            }
        }
        if (r == 1) {
            r = set_master_key(l, key);
        } else {
            vd_secret_free(key, key ? l->key_bytes : 0);
            if (r == 0) {
                vd_error_setg(errp, EPERM, "Invalid password, cannot unlock any keyslot");
                r = -EPERM;
            } else {
                vd_error_setg_errno(errp, -r, "Unable to read LUKS key slots");
            }
        }
        if (r < 0) {
            vd_luks_free(l);
            return r;
        }
    }
    *out = l;
    return 0;
}

/* ---- creating ---- */

/* CPU time of this thread in milliseconds (what QEMU's benchmark counts, immune to load). */
static uint64_t thread_cpu_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* PBKDF2 iterations per second with this hash (QEMU's qcrypto_pbkdf2_count_iters). */
static int pbkdf2_rate(gnutls_mac_algorithm_t mac, size_t key_len, uint64_t *rate)
{
    uint8_t key[LUKS_MAX_KEY] = {0}, salt[LUKS_SALT_LEN] = {0}, out[LUKS_MAX_KEY];
    uint64_t iters = 1u << 15;
    for (int round = 0; round < 40; round++) {
        uint64_t t0 = thread_cpu_ms();
        if (pbkdf2(mac, key, key_len, salt, (uint32_t)iters, out, key_len) < 0) {
            return -EIO;
        }
        uint64_t ms = thread_cpu_ms() - t0;
        if (ms > 500) {
            *rate = iters * 1000 / ms;
            return 0;
        }
        uint64_t next = ms ? iters * 1000 / ms : iters * 2;
        iters = next > iters ? next : iters * 2;
        if (iters > UINT32_MAX) {
            iters = UINT32_MAX;
        }
    }
    *rate = iters;
    return 0;
}

static int random_uuid(char *out)
{
    uint8_t u[16];
    if (gnutls_rnd(GNUTLS_RND_NONCE, u, sizeof(u)) < 0) {
        return -EIO;
    }
    u[6] = (uint8_t)((u[6] & 0x0f) | 0x40); /* version 4 */
    u[8] = (uint8_t)((u[8] & 0x3f) | 0x80); /* RFC 4122 variant */
    snprintf(out, LUKS_UUID_LEN + 1,
             "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
             u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12],
             u[13], u[14], u[15]);
    return 0;
}

/* Names and key length of the create options (QEMU's defaults for what is not given). */
static int create_names(VdLuks *l, const VdLuksCreateOptions *o, VdError **errp)
{
    const char *calg = o->cipher_alg ? o->cipher_alg : "aes-256";
    const char *mode = o->cipher_mode ? o->cipher_mode : "xts";
    const char *ivgen = o->ivgen_alg ? o->ivgen_alg : "plain64";
    const char *hash = o->hash_alg ? o->hash_alg : "sha256";
    int bits = !strcmp(calg, "aes-128") ? 128 : !strcmp(calg, "aes-192") ? 192
             : !strcmp(calg, "aes-256") ? 256 : 0;
    if (!bits) {
        vd_error_setg(errp, ENOTSUP, "Cipher algorithm '%s' is not supported (aes-128, aes-192, "
                      "aes-256)", calg);
        return -ENOTSUP;
    }
    if (strcmp(mode, "xts") != 0 && strcmp(mode, "cbc") != 0) {
        vd_error_setg(errp, ENOTSUP, "Cipher mode '%s' is not supported (xts, cbc)", mode);
        return -ENOTSUP;
    }
    const HashName *hn = hash_by_name(hash);
    if (!hn) {
        vd_error_setg(errp, ENOTSUP, "Hash algorithm '%s' is not supported", hash);
        return -ENOTSUP;
    }
    snprintf(l->cipher_name, sizeof(l->cipher_name), "aes");
    if (!strcmp(ivgen, "essiv")) {
        snprintf(l->cipher_mode, sizeof(l->cipher_mode), "%s-essiv:%s", mode,
                 o->ivgen_hash_alg ? o->ivgen_hash_alg : "sha256");
    } else {
        snprintf(l->cipher_mode, sizeof(l->cipher_mode), "%s-%s", mode, ivgen);
    }
    snprintf(l->hash_spec, sizeof(l->hash_spec), "%s", hash);
    l->hash = hn->dig;
    l->mac = hn->mac;
    l->key_bytes = (uint32_t)(bits / 8 * (strcmp(mode, "xts") ? 1 : 2));
    return alg_setup(&l->alg, l->cipher_name, l->cipher_mode, l->key_bytes, errp);
}

/* Iterations for iter_time ms at rate/s, divided (QEMU divides the digest's by 8), >= 1000. */
static int iters_for(uint64_t rate, uint64_t iter_time, uint32_t div, uint32_t *out,
                     VdError **errp)
{
    if (iter_time && rate > UINT64_MAX / iter_time) {
        vd_error_setg(errp, ERANGE, "PBKDF iteration count is too large");
        return -ERANGE;
    }
    uint64_t n = rate * iter_time / 1000 / div;
    if (n > UINT32_MAX) {
        vd_error_setg(errp, ERANGE, "PBKDF iteration count is too large");
        return -ERANGE;
    }
    *out = n < LUKS_MIN_ITERS ? LUKS_MIN_ITERS : (uint32_t)n;
    return 0;
}

int vd_luks_create(const VdLuksCreateOptions *o, const char *password, size_t pwlen,
                   VdLuks **out, VdError **errp)
{
    VdLuks *l = luks_new();
    if (!l) {
        vd_error_setg(errp, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    int r = create_names(l, o, errp);
    uint64_t iter_time = o->iter_time ? o->iter_time : 2000;
    uint64_t rate = 0;
    uint8_t *key = NULL;
    uint8_t slot_key[LUKS_MAX_KEY], essiv[64];
    if (r < 0) {
        goto fail;
    }
    r = -EIO;
    key = malloc(l->key_bytes);
    if (!key || gnutls_rnd(GNUTLS_RND_KEY, key, l->key_bytes) < 0 ||
        gnutls_rnd(GNUTLS_RND_NONCE, l->mk_salt, LUKS_SALT_LEN) < 0 || random_uuid(l->uuid) < 0 ||
        pbkdf2_rate(l->mac, l->key_bytes, &rate) < 0) {
        vd_error_setg(errp, EIO, "Unable to generate LUKS keys");
        goto fail;
    }
    if ((r = iters_for(rate, iter_time, 8, &l->mk_iters, errp)) < 0 ||
        (r = pbkdf2(l->mac, key, l->key_bytes, l->mk_salt, l->mk_iters, l->mk_digest,
                    LUKS_DIGEST_LEN)) < 0) {
        goto fail;
    }
    /* Layout: header, then eight aligned slot areas, then the payload (QEMU's). */
    size_t split = material_len(l, LUKS_STRIPES);
    uint32_t area = (uint32_t)((split + LUKS_SLOT_ALIGN - 1) / LUKS_SLOT_ALIGN * LUKS_SLOT_ALIGN /
                               VD_LUKS_SECTOR_SIZE);
    uint32_t first = LUKS_SLOT_AREA_OFFSET / VD_LUKS_SECTOR_SIZE;
    for (int i = 0; i < LUKS_NUM_SLOTS; i++) {
        l->slots[i].active = LUKS_SLOT_DISABLED;
        l->slots[i].key_offset = first + (uint32_t)i * area;
        l->slots[i].stripes = LUKS_STRIPES;
    }
    l->payload_offset = first + LUKS_NUM_SLOTS * area;
    LuksSlot *s = &l->slots[0];
    if ((r = iters_for(rate, iter_time, 1, &s->iters, errp)) < 0) {
        goto fail;
    }
    r = -EIO;
    l->material_len = split;
    l->material = calloc(1, split);
    if (!l->material || gnutls_rnd(GNUTLS_RND_NONCE, s->salt, LUKS_SALT_LEN) < 0 ||
        af_run(l->hash, l->material, LUKS_STRIPES, key, l->key_bytes, true) < 0 ||
        pbkdf2(l->mac, password, pwlen, s->salt, s->iters, slot_key, l->key_bytes) < 0 ||
        essiv_key_of(&l->alg, slot_key, essiv) < 0 ||
        sectors_crypt(&l->alg, slot_key, essiv, 0, l->material, split, true) < 0) {
        vd_error_setg(errp, EIO, "Unable to make the LUKS key slot");
        goto fail;
    }
    s->active = LUKS_SLOT_ENABLED;
    explicit_bzero(slot_key, sizeof(slot_key));
    explicit_bzero(essiv, sizeof(essiv));
    if ((r = set_master_key(l, key)) < 0) {
        vd_error_setg(errp, EIO, "Unable to derive the ESSIV key");
        vd_luks_free(l);
        return r;
    }
    *out = l;
    return 0;
fail:
    explicit_bzero(slot_key, sizeof(slot_key));
    explicit_bzero(essiv, sizeof(essiv));
    vd_secret_free(key, key ? l->key_bytes : 0);
    vd_luks_free(l);
    return r;
}

int vd_luks_write_header(VdLuks *l, VdLuksWriteFn wr, void *opaque, VdError **errp)
{
    uint8_t h[LUKS_HDR_SIZE];
    format_header(l, h);
    int r = wr(opaque, 0, h, sizeof(h));
    if (r == 0 && l->material) {
        r = wr(opaque, (uint64_t)l->slots[0].key_offset * VD_LUKS_SECTOR_SIZE, l->material,
               l->material_len);
    }
    if (r < 0) {
        vd_error_setg_errno(errp, -r, "Unable to write LUKS header");
        return r;
    }
    vd_secret_free(l->material, l->material_len);
    l->material = NULL;
    return 0;
}

uint64_t vd_luks_header_len(const VdLuks *l)
{
    return (uint64_t)l->payload_offset * VD_LUKS_SECTOR_SIZE;
}

bool vd_luks_unlocked(const VdLuks *l)
{
    return l->master_key != NULL;
}

json_t *vd_luks_info(const VdLuks *l)
{
    char calg[16];
    snprintf(calg, sizeof(calg), "aes-%d", l->alg.key_bits);
    static const char *const ivgen_names[] = {"plain", "plain64", "essiv"};
    json_t *slots = json_array();
    for (int i = 0; i < LUKS_NUM_SLOTS; i++) {
        const LuksSlot *s = &l->slots[i];
        bool active = s->active == LUKS_SLOT_ENABLED;
        json_t *o = json_object();
        json_object_set_new(o, "active", json_boolean(active));
        if (active) {
            json_object_set_new(o, "iters", json_integer(s->iters));
            json_object_set_new(o, "stripes", json_integer(s->stripes));
        }
        json_object_set_new(o, "key-offset",
                            json_integer((json_int_t)s->key_offset * VD_LUKS_SECTOR_SIZE));
        json_array_append_new(slots, o);
    }
    json_t *info = json_object();
    json_object_set_new(info, "cipher-alg", json_string(calg));
    json_object_set_new(info, "cipher-mode", json_string(l->alg.xts ? "xts" : "cbc"));
    json_object_set_new(info, "ivgen-alg", json_string(ivgen_names[l->alg.ivgen]));
    if (l->alg.ivgen == IV_ESSIV) {
        json_object_set_new(info, "ivgen-hash-alg", json_string(l->alg.ivhash_name));
    }
    json_object_set_new(info, "hash-alg", json_string(l->hash_spec));
    json_object_set_new(info, "payload-offset", json_integer((json_int_t)vd_luks_header_len(l)));
    json_object_set_new(info, "master-key-iters", json_integer(l->mk_iters));
    json_object_set_new(info, "uuid", json_string(l->uuid));
    json_object_set_new(info, "slots", slots);
    return info;
}

void vd_luks_free(VdLuks *l)
{
    if (!l) {
        return;
    }
    vd_secret_free(l->master_key, l->master_key ? l->key_bytes : 0);
    vd_secret_free(l->material, l->material_len);
    explicit_bzero(l, sizeof(*l));
    free(l);
}
