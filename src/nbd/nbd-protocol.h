/*
 * nbd-protocol.h - NBD wire constants (fixed newstyle handshake, transmission, structured replies)
 * and the server-internal types shared by the handshake, transmission and server files.
 * Every multi-byte field on the wire is big-endian; these are the only definitions of them.
 */
#ifndef VDISK_NBD_NBD_PROTOCOL_H
#define VDISK_NBD_NBD_PROTOCOL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "block/block.h"
#include "block/tracking.h"
#include "block/users.h"
#include "nbd/nbd-server.h"
#include "util/tls-creds.h"

/* ---- handshake ---- */
#define NBD_MAGIC 0x4e42444d41474943ULL      /* "NBDMAGIC" */
#define NBD_OPTS_MAGIC 0x49484156454F5054ULL /* "IHAVEOPT" */
#define NBD_REP_MAGIC 0x0003e889045565a9ULL  /* option reply magic */

#define NBD_FLAG_FIXED_NEWSTYLE (1 << 0)
#define NBD_FLAG_NO_ZEROES (1 << 1)
#define NBD_FLAG_C_FIXED_NEWSTYLE (1 << 0)
#define NBD_FLAG_C_NO_ZEROES (1 << 1)

#define NBD_OPT_EXPORT_NAME 1
#define NBD_OPT_ABORT 2
#define NBD_OPT_LIST 3
#define NBD_OPT_STARTTLS 5
#define NBD_OPT_INFO 6
#define NBD_OPT_GO 7
#define NBD_OPT_STRUCTURED_REPLY 8
#define NBD_OPT_LIST_META_CONTEXT 9
#define NBD_OPT_SET_META_CONTEXT 10

#define NBD_REP_ACK 1
#define NBD_REP_SERVER 2
#define NBD_REP_INFO 3
#define NBD_REP_META_CONTEXT 4
#define NBD_REP_ERR(n) ((1U << 31) | (n))
#define NBD_REP_ERR_UNSUP NBD_REP_ERR(1)
#define NBD_REP_ERR_POLICY NBD_REP_ERR(2)
#define NBD_REP_ERR_INVALID NBD_REP_ERR(3)
#define NBD_REP_ERR_PLATFORM NBD_REP_ERR(4)
#define NBD_REP_ERR_TLS_REQD NBD_REP_ERR(5)
#define NBD_REP_ERR_UNKNOWN NBD_REP_ERR(6)
#define NBD_REP_ERR_SHUTDOWN NBD_REP_ERR(7)
#define NBD_REP_ERR_BLOCK_SIZE_REQD NBD_REP_ERR(8)
#define NBD_REP_ERR_TOO_BIG NBD_REP_ERR(9)

#define NBD_INFO_EXPORT 0
#define NBD_INFO_NAME 1
#define NBD_INFO_DESCRIPTION 2
#define NBD_INFO_BLOCK_SIZE 3

/* ---- transmission flags (16 bits, sent with the export size) ---- */
#define NBD_FLAG_HAS_FLAGS (1 << 0)
#define NBD_FLAG_READ_ONLY (1 << 1)
#define NBD_FLAG_SEND_FLUSH (1 << 2)
#define NBD_FLAG_SEND_FUA (1 << 3)
#define NBD_FLAG_ROTATIONAL (1 << 4)
#define NBD_FLAG_SEND_TRIM (1 << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES (1 << 6)
#define NBD_FLAG_SEND_DF (1 << 7)
#define NBD_FLAG_CAN_MULTI_CONN (1 << 8)
#define NBD_FLAG_SEND_RESIZE (1 << 9)
#define NBD_FLAG_SEND_CACHE (1 << 10)
#define NBD_FLAG_SEND_FAST_ZERO (1 << 11)

/* ---- requests ---- */
#define NBD_REQUEST_MAGIC 0x25609513U
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698U
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efU
#define NBD_REQUEST_SIZE 28
#define NBD_SIMPLE_REPLY_SIZE 16
#define NBD_CHUNK_HEADER_SIZE 20

#define NBD_CMD_FLAG_FUA (1 << 0)
#define NBD_CMD_FLAG_NO_HOLE (1 << 1)
#define NBD_CMD_FLAG_DF (1 << 2)
#define NBD_CMD_FLAG_REQ_ONE (1 << 3)
#define NBD_CMD_FLAG_FAST_ZERO (1 << 4)

#define NBD_CMD_READ 0
#define NBD_CMD_WRITE 1
#define NBD_CMD_DISC 2
#define NBD_CMD_FLUSH 3
#define NBD_CMD_TRIM 4
#define NBD_CMD_CACHE 5
#define NBD_CMD_WRITE_ZEROES 6
#define NBD_CMD_BLOCK_STATUS 7

#define NBD_REPLY_FLAG_DONE (1 << 0)
#define NBD_REPLY_TYPE_NONE 0
#define NBD_REPLY_TYPE_OFFSET_DATA 1
#define NBD_REPLY_TYPE_OFFSET_HOLE 2
#define NBD_REPLY_TYPE_BLOCK_STATUS 5
#define NBD_REPLY_TYPE_ERROR ((1 << 15) + 1)
#define NBD_REPLY_TYPE_ERROR_OFFSET ((1 << 15) + 2)

#define NBD_EPERM 1
#define NBD_EIO 5
#define NBD_ENOMEM 12
#define NBD_EINVAL 22
#define NBD_ENOSPC 28
#define NBD_EOVERFLOW 75
#define NBD_ENOTSUP 95
#define NBD_ESHUTDOWN 108

#define NBD_STATE_HOLE (1 << 0)
#define NBD_STATE_ZERO (1 << 1)
#define NBD_META_BASE_ALLOCATION "base:allocation"
#define NBD_META_ID_BASE_ALLOCATION 1
#define NBD_META_DIRTY_BITMAP "qemu:dirty-bitmap:" /* + bitmap name (QEMU's namespace) */
#define NBD_STATE_DIRTY (1 << 0)
/* QEMU's: per extent, the chain layer deciding it (1 = the export's node, 0 = none). */
#define NBD_META_ALLOCATION_DEPTH "qemu:allocation-depth"

/* ---- server limits ---- */
#define NBD_MAX_PAYLOAD (32u * 1024 * 1024) /* largest READ/WRITE/CACHE length we serve */
#define NBD_MIN_BLOCK 1
#define NBD_PREF_BLOCK 4096
#define NBD_MAX_OPTION_LEN 65536            /* option payloads longer than this: disconnect */
#define NBD_MAX_STRING 4096
#define NBD_MAX_INFLIGHT_PER_CONN 64        /* reader stops reading when this many are queued */
#define NBD_MAX_EXTENTS 1024                /* block status descriptors per reply */

/* ---- server-internal types ---- */

/* A dirty bitmap an export serves as qemu:dirty-bitmap:NAME (node ref held, bitmap kept busy). */
typedef struct NbdExportBitmap {
    BlockNode *node;
    char *name;
} NbdExportBitmap;

struct NbdExport {
    char *id;
    char *name;
    char *description;
    bool writable;
    int refcnt;             /* server list + each connection; protected by the server lock */
    bool deleted;           /* removed from the list; no new clients */
    unsigned clients;       /* connections in transmission on it (server lock) */
    NbdExportBitmap *bitmaps; /* fixed at creation; metadata context i + 1 is bitmaps[i] */
    uint32_t nbitmaps;
    bool alloc_depth;       /* serves qemu:allocation-depth, context index 1 + nbitmaps */

    pthread_mutex_t lock;   /* protects the fields below */
    pthread_cond_t cond;
    BlockNode *node;        /* ref held; swapped only while quiesced */
    BlockTracker *tracker;  /* tracker of node; ref held */
    unsigned quiesce;       /* drain_begin nesting: > 0 = new requests wait */
    unsigned in_flight;     /* requests admitted and not yet finished */
    VdNodeUser user;        /* registered while listed: jobs drain and repoint it (users.h) */
};

typedef struct NbdConn NbdConn;
struct NbdConn {
    int fd;
    NbdExport *exp;           /* set by the handshake (ref held) */
    bool attached;            /* counted in exp->clients */
    bool structured;          /* NBD_OPT_STRUCTURED_REPLY negotiated */
    bool no_zeroes;
    /*
     * Metadata contexts selected (NBD_OPT_SET_META_CONTEXT) for the export named meta_export:
     * meta_sel[0] base:allocation, meta_sel[i] the export's bitmap i - 1; context id = index + 1.
     */
    bool *meta_sel;
    uint32_t meta_nsel;
    char *meta_export;
    uint16_t tflags;          /* transmission flags sent */
    VdTlsCreds *tls_creds;    /* the server's (borrowed: it outlives its connections); NULL = plain */
    VdAuthz *tls_authz;       /* likewise, NULL = any peer the credentials admit */
    gnutls_session_t tls;     /* after NBD_OPT_STARTTLS: every byte goes through it */

    pthread_mutex_t send_lock; /* serialises every write to fd during transmission */
    pthread_mutex_t lock;      /* protects the fields below */
    pthread_cond_t cond;       /* reader: in_flight/queued_bytes dropped */
    pthread_cond_t wcond;      /* writer: a reply was queued or writer_exit set */
    unsigned in_flight;        /* requests admitted whose reply is not yet sent (or dropped) */
    uint64_t queued_bytes;     /* payload bytes reserved by those requests (memory bound) */
    bool dead;                 /* a send failed: stop reading, drop further replies */
    bool writer_exit;
    bool writer_done;          /* the writer has left (its recycled thread may serve others) */
    /*
     * A thread owns the send side: the writer while it sends, or a worker sending its reply
     * directly (non-blocking) because the queue was empty. Whoever owns it is the only sender.
     */
    bool sending;
    struct NbdReply *rq_head, *rq_tail; /* replies waiting for the writer thread */

    NbdConn *next;             /* server's connection list (server lock) */
};

/* nbd-server.c: lookup / refcount helpers for the handshake and transmission. */
NbdExport *nbd_server_get_export(const char *name); /* new ref, NULL if absent */
void nbd_export_unref(NbdExport *exp);
void nbd_server_list_exports(void (*cb)(NbdExport *exp, void *opaque), void *opaque);
bool nbd_server_shutting_down(void);
/*
 * Make conn a client of exp (steals the ref) before the handshake's final reply, so that the client
 * count is right as soon as the client can send requests. -ENOENT if exp was deleted meanwhile,
 * -ESHUTDOWN if the server is stopping (the ref is dropped then).
 */
int nbd_conn_attach(NbdConn *conn, NbdExport *exp);

/*
 * Admission of n requests against drain (each later calls nbd_export_leave once): all of them or
 * none wait for a drain to end. Returns the node and tracker they use (borrowed until they leave).
 */
void nbd_export_enter_n(NbdExport *exp, unsigned n, BlockNode **node, BlockTracker **tracker);
void nbd_export_leave(NbdExport *exp);

/* nbd-io.c: full reads/writes on a socket. 0 on success, -errno (or -EPIPE on EOF). */
int nbd_read_full(int fd, void *buf, size_t len);
int nbd_write_full(int fd, const void *buf, size_t len);

/*
 * nbd-tls.c: a connection's byte I/O (through its TLS session when it has one; straight to the
 * socket otherwise), 0 / -errno as nbd-io.c; nbd_conn_recv returns what arrived (0 at EOF).
 */
ssize_t nbd_conn_recv(NbdConn *c, void *buf, size_t len);
int nbd_conn_read(NbdConn *c, void *buf, size_t len);
int nbd_conn_write(NbdConn *c, const void *buf, size_t len);
int nbd_conn_discard(NbdConn *c, uint64_t len);
/* After NBD_OPT_STARTTLS was acknowledged: handshake, check the peer. <0 = drop the client. */
int nbd_tls_starttls(NbdConn *c);
/* End the TLS session, if any (before the socket is closed). */
void nbd_tls_close(NbdConn *c);

/* nbd-handshake.c: negotiate; 0 = conn->exp set and transmission may start, <0 = drop client. */
int nbd_handshake(NbdConn *conn);

/* nbd-transmission.c */
int nbd_pool_start(unsigned nthreads);
void nbd_pool_stop(void);
/* Serve requests until the client disconnects; returns once every in-flight request replied. */
void nbd_transmission(NbdConn *conn);

/* nbd-meta.c: metadata contexts */
/* The contexts exp serves: base:allocation, its bitmaps, then qemu:allocation-depth if asked. */
uint32_t nbd_meta_count(const NbdExport *exp);
/* Mark in sel (nbd_meta_count entries) the contexts query q (ql bytes) names; list = a LIST
 * query, where namespaces ("base:", "qemu:", "qemu:dirty-bitmap:") select all their contexts. */
void nbd_meta_match(const NbdExport *exp, const uint8_t *q, uint32_t ql, bool list, bool *sel);
/* The name of context index i of exp into buf (NBD_MAX_STRING + 1 bytes); its length. */
size_t nbd_meta_name(const NbdExport *exp, uint32_t i, char *buf);
/* Forget the connection's selection (a new SET, another export, the end of the connection). */
void nbd_meta_reset(NbdConn *c);
/* Did the client select any context (may it send BLOCK_STATUS)? */
bool nbd_meta_any(const NbdConn *c);
/*
 * The reply to BLOCK_STATUS [offset, offset+len) of node: one chunk per selected context (the
 * last flagged DONE), in a new buffer *buf of *blen bytes. 0 or -errno.
 */
int nbd_meta_block_status(NbdConn *c, BlockNode *node, uint64_t cookie, uint64_t offset,
                          uint32_t len, bool req_one, uint8_t **buf, size_t *blen);

/* big-endian helpers */
static inline void nbd_put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v; }
static inline void nbd_put32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}
static inline void nbd_put64(uint8_t *p, uint64_t v)
{
    nbd_put32(p, v >> 32);
    nbd_put32(p + 4, (uint32_t)v);
}
/* A structured reply chunk's header (NBD_CHUNK_HEADER_SIZE bytes). */
static inline void nbd_put_chunk(uint8_t *p, uint64_t cookie, uint16_t flags, uint16_t type,
                                 uint32_t len)
{
    nbd_put32(p, NBD_STRUCTURED_REPLY_MAGIC);
    nbd_put16(p + 4, flags);
    nbd_put16(p + 6, type);
    nbd_put64(p + 8, cookie);
    nbd_put32(p + 16, len);
}
static inline uint16_t nbd_get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t nbd_get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t nbd_get64(const uint8_t *p)
{
    return (uint64_t)nbd_get32(p) << 32 | nbd_get32(p + 4);
}

#endif
