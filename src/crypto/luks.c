/*
 * luks.c - LUKS1 headers, key slots and sector encryption: PBKDF2, hashes and AES-CBC/XTS from
 * GnuTLS, the other ciphers and modes QEMU offers (aes/serpent/twofish/cast5 in ecb, cbc, ctr,
 * xts) from nettle's ciphers and mode functions; no primitive is written here. Invariants: a VdLuks is immutable once opened or created
 * (sector calls share it between threads; each call makes its own cipher handles), and every
 * buffer that held a key (master key, slot keys, split key material, passwords) is wiped before
 * it is freed. Layout of new headers follows QEMU's crypto/block-luks.c: 4 KiB for the header,
 * then eight 4 KiB-aligned key-material areas, then the payload.
 */
#include <endian.h>
#include <errno.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <nettle/cbc.h>
#include <nettle/ctr.h>
#include <nettle/hmac.h>
#include <nettle/nettle-meta.h>
#include <nettle/pbkdf2.h>
#include <nettle/ripemd160.h>
#include <nettle/xts.h>
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
enum { MODE_ECB, MODE_CBC, MODE_XTS, MODE_CTR };

/* QEMU's cipher modes and IV generators (QCryptoCipherMode, QCryptoIVGenAlgorithm), by value. */
static const char *const mode_names[] = {"ecb", "cbc", "xts", "ctr", NULL};
static const char *const ivgen_names[] = {"plain", "plain64", "essiv", NULL};

/*
 * A block cipher with one key size: its name in a LUKS header ("aes"), QEMU's name for it
 * ("aes-128") and nettle's implementation.
 */
typedef struct LuksCipher {
    const char *family;
    const char *qapi;
    size_t key_len;
    const struct nettle_cipher *nc;
} LuksCipher;

static const LuksCipher ciphers[] = {
    {"aes", "aes-128", 16, &nettle_aes128},
    {"aes", "aes-192", 24, &nettle_aes192},
    {"aes", "aes-256", 32, &nettle_aes256},
    {"cast5", "cast5-128", 16, &nettle_cast128},
    {"serpent", "serpent-128", 16, &nettle_serpent128},
    {"serpent", "serpent-192", 24, &nettle_serpent192},
    {"serpent", "serpent-256", 32, &nettle_serpent256},
    {"twofish", "twofish-128", 16, &nettle_twofish128},
    {"twofish", "twofish-192", 24, &nettle_twofish192},
    {"twofish", "twofish-256", 32, &nettle_twofish256},
    {NULL, NULL, 0, NULL}};

static const LuksCipher *cipher_by_family(const char *family, size_t key_len)
{
    for (const LuksCipher *c = ciphers; c->family; c++) {
        if (!strcmp(c->family, family) && c->key_len == key_len) {
            return c;
        }
    }
    return NULL;
}

/* The sector cipher a header names (payload and key material use the same one). */
typedef struct LuksAlg {
    const LuksCipher *cipher; /* one key's cipher; xts keys are two of them */
    int mode;
    size_t key_len;           /* the whole key (xts: both halves) */
    size_t iv_len;            /* the cipher's block; 0 in ecb mode, which takes no IV */
    gnutls_cipher_algorithm_t gnutls; /* GnuTLS's faster AES-CBC/XTS, or UNKNOWN: nettle's modes */
    int ivgen;
    gnutls_digest_algorithm_t ivhash; /* essiv */
    const char *ivhash_name;
    const LuksCipher *essiv_cipher; /* the cipher's family keyed by the hash's length */
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
    {"md5", GNUTLS_DIG_MD5, GNUTLS_MAC_MD5},
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

static int name_index(const char *const *names, const char *name)
{
    for (int i = 0; names[i]; i++) {
        if (!strcmp(names[i], name)) {
            return i;
        }
    }
    return -1;
}

/* GnuTLS's AES in the modes it has (faster than nettle's generic modes), else UNKNOWN. */
static gnutls_cipher_algorithm_t gnutls_alg(const LuksCipher *c, int mode)
{
    if (strcmp(c->family, "aes") != 0) {
        return GNUTLS_CIPHER_UNKNOWN;
    }
    if (mode == MODE_CBC) {
        return c->key_len == 16 ? GNUTLS_CIPHER_AES_128_CBC
             : c->key_len == 24 ? GNUTLS_CIPHER_AES_192_CBC : GNUTLS_CIPHER_AES_256_CBC;
    }
    if (mode == MODE_XTS && c->key_len != 24) {
        return c->key_len == 16 ? GNUTLS_CIPHER_AES_128_XTS : GNUTLS_CIPHER_AES_256_XTS;
    }
    return GNUTLS_CIPHER_UNKNOWN;
}

/*
 * ESSIV's cipher: the sector cipher's family with the IV hash's length as key (dm-crypt's rule,
 * which QEMU follows), with QEMU's messages.
 */
static int essiv_cipher(LuksAlg *a, VdError **errp)
{
    size_t dlen = gnutls_hash_get_len(a->ivhash);
    if (dlen == a->cipher->key_len) {
        a->essiv_cipher = a->cipher;
        return 0;
    }
    static const char *const display[][2] = {{"aes", "AES"}, {"serpent", "Serpent"},
                                             {"twofish", "Twofish"}};
    for (size_t i = 0; i < sizeof(display) / sizeof(display[0]); i++) {
        if (!strcmp(display[i][0], a->cipher->family)) {
            a->essiv_cipher = cipher_by_family(a->cipher->family, dlen);
            if (!a->essiv_cipher) {
                vd_error_setg(errp, ENOTSUP, "No %s cipher with key size %zu available",
                              display[i][1], dlen);
                return -ENOTSUP;
            }
            return 0;
        }
    }
    vd_error_setg(errp, ENOTSUP, "Cipher %s not supported with essiv", a->cipher->qapi);
    return -ENOTSUP;
}

/*
 * The sector cipher for a header's cipher name ("aes"), mode ("xts-plain64", "cbc-essiv:sha256",
 * ...) and key length in bytes (xts: two keys): QEMU's parse, in its order, with its messages.
 */
static int alg_setup(LuksAlg *a, const char *cipher, const char *mode, size_t key_len,
                     VdError **errp)
{
    memset(a, 0, sizeof(*a));
    char chain[LUKS_NAME_LEN + 1];
    snprintf(chain, sizeof(chain), "%s", mode);
    char *ivgen = strchr(chain, '-');
    if (!ivgen) {
        vd_error_setg(errp, EINVAL, "Unexpected cipher mode string format '%s'", mode);
        return -EINVAL;
    }
    *ivgen++ = 0;
    char *ivhash = strchr(ivgen, ':');
    const HashName *h = NULL;
    if (ivhash) {
        *ivhash++ = 0;
        if (!(h = hash_by_name(ivhash))) {
            vd_error_setg(errp, ENOTSUP, "Hash algorithm '%s' not supported", ivhash);
            return -ENOTSUP;
        }
    }
    a->mode = name_index(mode_names, chain);
    if (a->mode < 0) {
        vd_error_setg(errp, ENOTSUP, "Cipher mode '%s' not supported", chain);
        return -ENOTSUP;
    }
    size_t one_key = a->mode == MODE_XTS ? key_len / 2 : key_len;
    a->cipher = cipher_by_family(cipher, one_key);
    if (!a->cipher) {
        vd_error_setg(errp, ENOTSUP, "Algorithm '%s' with key size %zu bytes not supported", cipher,
                      one_key);
        return -ENOTSUP;
    }
    if (a->mode == MODE_XTS && key_len % 2) {
        /* a header's key size is untrusted: 65 would pass as two 32-byte keys */
        vd_error_setg(errp, EINVAL, "XTS cipher key length should be a multiple of 2");
        return -EINVAL;
    }
    a->key_len = key_len;
    a->iv_len = a->mode == MODE_ECB ? 0 : a->cipher->nc->block_size;
    a->gnutls = gnutls_alg(a->cipher, a->mode);
    a->ivgen = name_index(ivgen_names, ivgen);
    if (a->ivgen < 0) {
        vd_error_setg(errp, ENOTSUP, "IV generator '%s' not supported", ivgen);
        return -ENOTSUP;
    }
    if (a->ivgen == IV_ESSIV) {
        if (!h) {
            vd_error_setg(errp, EINVAL, "Missing IV generator hash specification");
            return -EINVAL;
        }
        a->ivhash = h->dig;
        a->ivhash_name = h->name;
        return essiv_cipher(a, errp);
    }
    return 0;
}

/* Can the sector cipher run at all? QEMU asks when it makes the cipher (unlock, create). */
static int alg_usable(const LuksAlg *a, VdError **errp)
{
    if (a->mode == MODE_XTS && a->cipher->nc->block_size != 16) {
        vd_error_setg(errp, ENOTSUP, "Unsupported cipher mode xts");
        return -ENOTSUP;
    }
    return 0;
}

/* ---- the sector cipher ---- */

/*
 * One call's cipher state: GnuTLS's handle, or nettle contexts for the data key (data), the
 * decrypting direction (dec: cbc, ecb and xts decrypt with their own key schedule), the xts tweak
 * key (tweak) and the ESSIV key (essiv). Made per call, so a VdLuks stays shareable.
 */
typedef struct SectorCipher {
    const LuksAlg *a;
    gnutls_cipher_hd_t h;
    void *data, *tweak, *essiv;
    size_t data_size, tweak_size, essiv_size;
    bool enc;
} SectorCipher;

static void *nettle_ctx(const struct nettle_cipher *nc, bool enc, const uint8_t *key,
                        size_t *size)
{
    void *ctx = malloc(nc->context_size);
    if (ctx) {
        (enc ? nc->set_encrypt_key : nc->set_decrypt_key)(ctx, key);
        *size = nc->context_size;
    }
    return ctx;
}

static void sector_cipher_free(SectorCipher *sc)
{
    if (sc->h) {
        gnutls_cipher_deinit(sc->h);
    }
    vd_secret_free(sc->data, sc->data ? sc->data_size : 0);
    vd_secret_free(sc->tweak, sc->tweak ? sc->tweak_size : 0);
    vd_secret_free(sc->essiv, sc->essiv ? sc->essiv_size : 0);
}

static int sector_cipher_init(SectorCipher *sc, const LuksAlg *a, const uint8_t *key,
                              const uint8_t *essiv_key, bool enc)
{
    memset(sc, 0, sizeof(*sc));
    sc->a = a;
    sc->enc = enc;
    const struct nettle_cipher *nc = a->cipher->nc;
    bool ok = true;
    if (a->gnutls != GNUTLS_CIPHER_UNKNOWN) {
        uint8_t iv[AES_BLOCK] = {0};
        gnutls_datum_t k = {(unsigned char *)key, (unsigned int)a->key_len};
        gnutls_datum_t ivd = {iv, AES_BLOCK};
        ok = gnutls_cipher_init(&sc->h, a->gnutls, &k, &ivd) == 0;
        if (!ok) {
            sc->h = NULL;
        }
    } else {
        /* ctr and the xts tweak only ever encrypt */
        bool data_enc = enc || a->mode == MODE_CTR;
        ok = (sc->data = nettle_ctx(nc, data_enc, key, &sc->data_size)) != NULL;
        if (ok && a->mode == MODE_XTS) {
            ok = (sc->tweak = nettle_ctx(nc, true, key + a->key_len / 2, &sc->tweak_size)) != NULL;
        }
    }
    if (ok && a->ivgen == IV_ESSIV && a->iv_len) {
        ok = (sc->essiv = nettle_ctx(a->essiv_cipher->nc, true, essiv_key, &sc->essiv_size)) !=
             NULL;
    }
    if (!ok) {
        sector_cipher_free(sc);
        return -EIO;
    }
    return 0;
}

/* The IV of a sector (QEMU's ivgens: little-endian sector number, ESSIV encrypts it). */
static void sector_iv(const SectorCipher *sc, uint64_t sector, uint8_t *iv)
{
    const LuksAlg *a = sc->a;
    memset(iv, 0, a->iv_len);
    if (a->ivgen == IV_PLAIN) {
        uint32_t le = htole32((uint32_t)sector);
        memcpy(iv, &le, a->iv_len < sizeof(le) ? a->iv_len : sizeof(le));
    } else {
        uint64_t le = htole64(sector);
        memcpy(iv, &le, a->iv_len < sizeof(le) ? a->iv_len : sizeof(le));
    }
    if (a->ivgen == IV_ESSIV && a->iv_len) {
        a->essiv_cipher->nc->encrypt(sc->essiv, a->iv_len, iv, iv);
    }
}

static int sector_crypt(const SectorCipher *sc, uint8_t *iv, uint8_t *buf)
{
    const LuksAlg *a = sc->a;
    const struct nettle_cipher *nc = a->cipher->nc;
    size_t n = VD_LUKS_SECTOR_SIZE;
    if (sc->h) {
        gnutls_cipher_set_iv(sc->h, iv, AES_BLOCK);
        int r = sc->enc ? gnutls_cipher_encrypt(sc->h, buf, n) : gnutls_cipher_decrypt(sc->h, buf, n);
        return r == 0 ? 0 : -EIO;
    }
    switch (a->mode) {
    case MODE_ECB:
        (sc->enc ? nc->encrypt : nc->decrypt)(sc->data, n, buf, buf);
        break;
    case MODE_CBC:
        (sc->enc ? cbc_encrypt : cbc_decrypt)(sc->data, sc->enc ? nc->encrypt : nc->decrypt,
                                              nc->block_size, iv, n, buf, buf);
        break;
    case MODE_CTR:
        ctr_crypt(sc->data, nc->encrypt, nc->block_size, iv, n, buf, buf);
        break;
    default: /* MODE_XTS */
        if (sc->enc) {
            xts_encrypt_message(sc->data, sc->tweak, nc->encrypt, iv, n, buf, buf);
        } else {
            xts_decrypt_message(sc->data, sc->tweak, nc->decrypt, nc->encrypt, iv, n, buf, buf);
        }
        break;
    }
    return 0;
}

/*
 * Encrypt or decrypt len bytes (whole sectors) in place with key; the first sector is number
 * first_sector. ESSIV's IV key is H(key), given as essiv_key.
 */
static int sectors_crypt(const LuksAlg *a, const uint8_t *key, const uint8_t *essiv_key,
                         uint64_t first_sector, uint8_t *buf, size_t len, bool enc)
{
    SectorCipher sc;
    uint8_t iv[AES_BLOCK];
    int r = sector_cipher_init(&sc, a, key, essiv_key, enc);
    if (r < 0) {
        return r;
    }
    for (size_t done = 0; r == 0 && done < len; done += VD_LUKS_SECTOR_SIZE) {
        sector_iv(&sc, first_sector + done / VD_LUKS_SECTOR_SIZE, iv);
        r = sector_crypt(&sc, iv, buf + done);
    }
    sector_cipher_free(&sc);
    explicit_bzero(iv, sizeof(iv));
    return r;
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
        if (dig == GNUTLS_DIG_RMD160) {
            /* GnuTLS's hash API refuses RIPEMD-160: nettle's */
            struct ripemd160_ctx c;
            ripemd160_init(&c);
            ripemd160_update(&c, sizeof(be), (const uint8_t *)&be);
            ripemd160_update(&c, n, block + i * dlen);
            ripemd160_digest(&c, RIPEMD160_DIGEST_SIZE, out);
        } else {
            gnutls_hash_hd_t h;
            if (gnutls_hash_init(&h, dig) < 0) {
                return -EIO;
            }
            gnutls_hash(h, &be, sizeof(be));
            gnutls_hash(h, block + i * dlen, n);
            gnutls_hash_deinit(h, out);
        }
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
    int r = alg_setup(&l->alg, l->cipher_name, l->cipher_mode, l->key_bytes, errp);
    if (r < 0) {
        return r;
    }
    if (l->key_bytes > LUKS_MAX_KEY) {
        /* alg_setup admits only ciphers' own key sizes; every key buffer is LUKS_MAX_KEY bytes */
        vd_error_setg(errp, EINVAL, "LUKS key size %u is invalid", l->key_bytes);
        return -EINVAL;
    }
    const HashName *hn = hash_by_name(l->hash_spec);
    if (!hn) {
        vd_error_setg(errp, ENOTSUP, "Hash algorithm '%s' not supported", l->hash_spec);
        return -ENOTSUP;
    }
    l->hash = hn->dig;
    l->mac = hn->mac;
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

static int luks_pbkdf2(gnutls_mac_algorithm_t mac, const void *pw, size_t pwlen, const uint8_t *salt,
                  uint32_t iters, uint8_t *out, size_t outlen)
{
    if (mac == GNUTLS_MAC_RMD160) {
        /* GnuTLS's PBKDF2 refuses RIPEMD-160 (QEMU and cryptsetup take it): nettle's */
        struct hmac_ripemd160_ctx ctx;
        hmac_ripemd160_set_key(&ctx, pwlen, pw);
        PBKDF2(&ctx, hmac_ripemd160_update, hmac_ripemd160_digest, RIPEMD160_DIGEST_SIZE, iters,
               LUKS_SALT_LEN, salt, outlen, out);
        explicit_bzero(&ctx, sizeof(ctx));
        return 0;
    }
    gnutls_datum_t key = {(unsigned char *)pw, (unsigned int)pwlen};
    gnutls_datum_t s = {(unsigned char *)salt, LUKS_SALT_LEN};
    return gnutls_pbkdf2(mac, &key, &s, iters, out, outlen) == 0 ? 0 : -EIO;
}

/* Does key open the header (its PBKDF2 digest is the master key digest)? */
static bool master_key_matches(const VdLuks *l, const uint8_t *key)
{
    uint8_t digest[LUKS_DIGEST_LEN];
    bool ok = luks_pbkdf2(l->mac, key, l->key_bytes, l->mk_salt, l->mk_iters, digest,
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
        r = luks_pbkdf2(l->mac, pw, pwlen, s->salt, s->iters, slot_key, l->key_bytes);
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
        if ((r = alg_usable(&l->alg, errp)) < 0) {
            vd_luks_free(l);
            return r;
        }
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

/*
 * PBKDF2 iterations per second with this hash (QEMU's qcrypto_pbkdf2_count_iters): runs of the
 * hash until one lasts over min_ms of this thread's CPU time. QEMU always measures over 500 ms;
 * here min_ms is that for an iter_time of 500 ms or more (the default 2000 is measured as QEMU
 * does) and iter_time itself below that, but at least 50 ms: the measurement is then no longer
 * than the work it sizes (a scratch image with iter-time=10 no longer spends ~1 s measuring).
 * A count sized from a run over 50 ms of CPU time is within a few per cent.
 */
static int pbkdf2_rate(gnutls_mac_algorithm_t mac, size_t key_len, uint64_t iter_time,
                       uint64_t *rate)
{
    uint8_t key[LUKS_MAX_KEY] = {0}, salt[LUKS_SALT_LEN] = {0}, out[LUKS_MAX_KEY];
    uint64_t min_ms = iter_time >= 500 ? 500 : iter_time > 50 ? iter_time : 50;
    uint64_t iters = 1u << 15;
    for (int round = 0; round < 40; round++) {
        uint64_t t0 = thread_cpu_ms();
        if (luks_pbkdf2(mac, key, key_len, salt, (uint32_t)iters, out, key_len) < 0) {
            return -EIO;
        }
        uint64_t ms = thread_cpu_ms() - t0;
        if (ms > min_ms) {
            *rate = iters * 1000 / ms;
            return 0;
        }
        /* aim at twice the bound, so that one more run is nearly always enough */
        uint64_t next = ms ? iters * 2 * min_ms / ms : iters * 2;
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

/* A create option's value must be one of QEMU's enum values (QAPI's message), or NULL. */
static int check_enum(const char *param, const char *value, const char *const *values,
                      VdError **errp)
{
    if (value && name_index(values, value) < 0) {
        vd_error_setg(errp, EINVAL, "Parameter '%s' does not accept value '%s'", param, value);
        return -EINVAL;
    }
    return 0;
}

/* Names and key length of the create options (QEMU's defaults for what is not given). */
static int create_names(VdLuks *l, const VdLuksCreateOptions *o, VdError **errp)
{
    /* QEMU 7.2's QCryptoCipherAlgorithm and QCryptoHashAlgorithm values */
    static const char *const alg_values[] = {
        "aes-128", "aes-192", "aes-256", "des", "3des", "cast5-128", "serpent-128", "serpent-192",
        "serpent-256", "twofish-128", "twofish-192", "twofish-256", NULL};
    static const char *const hash_values[] = {"md5", "sha1", "sha224", "sha256", "sha384",
                                              "sha512", "ripemd160", NULL};
    if (check_enum("cipher-alg", o->cipher_alg, alg_values, errp) < 0 ||
        check_enum("cipher-mode", o->cipher_mode, mode_names, errp) < 0 ||
        check_enum("ivgen-alg", o->ivgen_alg, ivgen_names, errp) < 0 ||
        check_enum("ivgen-hash-alg", o->ivgen_hash_alg, hash_values, errp) < 0 ||
        check_enum("hash-alg", o->hash_alg, hash_values, errp) < 0) {
        return -EINVAL;
    }
    const char *calg = o->cipher_alg ? o->cipher_alg : "aes-256";
    const char *mode = o->cipher_mode ? o->cipher_mode : "xts";
    const char *ivgen = o->ivgen_alg ? o->ivgen_alg : "plain64";
    const char *hash = o->hash_alg ? o->hash_alg : "sha256";
    const char *ivhash = o->ivgen_hash_alg;
    if (!ivhash && !strcmp(ivgen, "essiv")) {
        ivhash = "sha256";
    }
    const LuksCipher *c = ciphers;
    while (c->family && strcmp(c->qapi, calg) != 0) {
        c++;
    }
    if (!c->family) {
        vd_error_setg(errp, ENOTSUP, "Algorithm '%s' not supported", calg);
        return -ENOTSUP;
    }
    snprintf(l->cipher_name, sizeof(l->cipher_name), "%s", c->family);
    /* as QEMU, an IV hash given with plain/plain64 is written (and ignored on reading) */
    if (ivhash) {
        snprintf(l->cipher_mode, sizeof(l->cipher_mode), "%s-%s:%s", mode, ivgen, ivhash);
    } else {
        snprintf(l->cipher_mode, sizeof(l->cipher_mode), "%s-%s", mode, ivgen);
    }
    snprintf(l->hash_spec, sizeof(l->hash_spec), "%s", hash);
    const HashName *hn = hash_by_name(hash);
    l->hash = hn->dig;
    l->mac = hn->mac;
    l->key_bytes = (uint32_t)(c->key_len * (strcmp(mode, "xts") ? 1 : 2));
    int r = alg_setup(&l->alg, l->cipher_name, l->cipher_mode, l->key_bytes, errp);
    return r < 0 ? r : alg_usable(&l->alg, errp);
}

int vd_luks_check_options(const VdLuksCreateOptions *o, VdError **errp)
{
    VdLuks scratch;
    memset(&scratch, 0, sizeof(scratch));
    return create_names(&scratch, o, errp);
}

/* Layout: header, then eight aligned slot areas, then the payload (QEMU's); the key material
 * bytes of one slot. */
static size_t layout_slots(VdLuks *l)
{
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
    return split;
}

int vd_luks_header_size(const VdLuksCreateOptions *o, uint64_t *len, VdError **errp)
{
    VdLuks scratch;
    memset(&scratch, 0, sizeof(scratch));
    int r = create_names(&scratch, o, errp);
    if (r < 0) {
        return r;
    }
    layout_slots(&scratch);
    *len = vd_luks_header_len(&scratch);
    return 0;
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
        pbkdf2_rate(l->mac, l->key_bytes, iter_time, &rate) < 0) {
        vd_error_setg(errp, EIO, "Unable to generate LUKS keys");
        goto fail;
    }
    if ((r = iters_for(rate, iter_time, 8, &l->mk_iters, errp)) < 0 ||
        (r = luks_pbkdf2(l->mac, key, l->key_bytes, l->mk_salt, l->mk_iters, l->mk_digest,
                    LUKS_DIGEST_LEN)) < 0) {
        goto fail;
    }
    size_t split = layout_slots(l);
    LuksSlot *s = &l->slots[0];
    if ((r = iters_for(rate, iter_time, 1, &s->iters, errp)) < 0) {
        goto fail;
    }
    r = -EIO;
    l->material_len = split;
    l->material = calloc(1, split);
    if (!l->material || gnutls_rnd(GNUTLS_RND_NONCE, s->salt, LUKS_SALT_LEN) < 0 ||
        af_run(l->hash, l->material, LUKS_STRIPES, key, l->key_bytes, true) < 0 ||
        luks_pbkdf2(l->mac, password, pwlen, s->salt, s->iters, slot_key, l->key_bytes) < 0 ||
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
    json_object_set_new(info, "cipher-alg", json_string(l->alg.cipher->qapi));
    json_object_set_new(info, "cipher-mode", json_string(mode_names[l->alg.mode]));
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
