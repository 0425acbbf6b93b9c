/*
 * nbd-connection.h - inside the NBD client: a node's state (NbdState), its connections (NbdConn)
 * and the commands in flight on them (NbdReq), shared by nbd.c (the block driver: URIs and
 * options, open and close, the I/O entry points) and nbd-connection.c (what moves the bytes: the
 * connections, their pump threads, reconnection). Not a public contract: protocols/nbd.h is.
 */
#ifndef VDISK_PROTOCOLS_NBD_CONNECTION_H
#define VDISK_PROTOCOLS_NBD_CONNECTION_H

#include <libnbd.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "block/block.h"
#include "util/error.h"
#include "util/tls-creds.h"

#define NBD_MAX_CONNS 4
/* Largest read/write payload per command when the server does not say (the spec's safe size). */
#define NBD_IO_MAX (32U << 20)
/* Largest zero/trim/block-status length per command (no payload; the wire field is 32 bits). */
#define NBD_CMD_MAX (1U << 30)
/* Extra multi-conn connections must be up within this, or the node makes do with fewer. */
#define NBD_EXTRA_CONNECT_MS 2000
/* Commands one caller has in flight at once (the pieces of one split request). */
#define NBD_BATCH 16
/* Default stall timeout (x-stall-timeout): commands outstanding and the socket silent this long. */
#define NBD_STALL_DEFAULT_S 60
/* One reconnection attempt (connect + handshake) gives up after this; the pump then retries. */
#define NBD_RECONNECT_TRY_MS 2000
/* Pause between failed reconnection attempts grows up to this. */
#define NBD_RECONNECT_PAUSE_MAX_MS 1000
/* A command is sent again at most this often after link losses, then fails. */
#define NBD_MAX_RESENDS 16

typedef struct NbdState NbdState;

/* One connection: the handle and the thread that moves its socket (and replaces it when lost). */
typedef struct NbdConn {
    NbdState *s;
    struct nbd_handle *h;     /* NULL while the link is down; changed only by the pump, under hlock */
    pthread_rwlock_t hlock;   /* shared: a submitter calling libnbd on h; exclusive: swapping h */
    int wake_fd;              /* eventfd: a submission may have changed the socket's direction */
    bool pump_started;
    bool stop;                /* atomic: the pump exits */
    pthread_t pump;
    pthread_mutex_t lock;     /* guards NbdReq.done/err of this connection's commands, up, down_ms */
    pthread_cond_t cond;      /* a command completed, or the link came back (CLOCK_MONOTONIC) */
    bool up;                  /* h is a live connection (written under lock, atomically) */
    int64_t down_ms;          /* when the link was lost (!up) */
    unsigned long epoch;      /* connections made after losses: which one a command went on */
    bool killing;             /* the pump reset this connection for a stall (until link_lost) */
    int64_t killed_ms;        /* when */
    bool wrong_export;        /* the last reconnection reached a server with another export */
} NbdConn;

typedef enum { OP_READ, OP_WRITE, OP_ZERO, OP_TRIM, OP_FLUSH, OP_STATUS } NbdOp;

/* One command and its outcome, filled in by its completion callback (or a failed submission). */
typedef struct NbdReq {
    NbdConn *c;
    NbdOp op;
    uint64_t off, len;
    uint8_t *buf;
    uint32_t flags;
    nbd_extent_callback *ext;
    int err;                  /* errno, 0 = success */
    bool done;
    int64_t fence_until;      /* failed on a stall kill: the server may still hold it this long */
} NbdReq;

/* A range the server may still write: a write of a connection reset for a stall (fence_add). */
typedef struct NbdFence {
    uint64_t off, len;
    int64_t until_ms;
} NbdFence;

#define NBD_MAX_FENCES 32

/*
 * What must not change when the connection is made again (conn_identity): a server that answers
 * differently is serving another export (or the same one configured otherwise).
 */
typedef struct NbdIdentity {
    int64_t size;
    unsigned flags;           /* NBD_ID_*: libnbd's can_... and is_... answers */
    int64_t block_min, block_pref, block_max;
    char *name;               /* canonical export name (NBD_INFO_NAME), or what we asked for */
    char *descr;              /* NBD_INFO_DESCRIPTION, NULL if the server offers none */
} NbdIdentity;

struct NbdState {
    NbdConn conn[NBD_MAX_CONNS];
    int nconns;
    unsigned next;            /* round-robin cursor (atomic) */
    uint64_t size;            /* export size, fixed for the node's life */
    uint32_t align;           /* server's minimum block size (power of two), 1 = byte granular */
    uint32_t max_io;          /* largest read/write payload, a multiple of align */
    bool read_only;           /* the export is read-only, or the node was opened read-only */
    bool export_read_only;    /* the server said so (a reconnection must say the same) */
    bool can_flush, can_fua, can_trim, can_zero, can_fast_zero, has_base_alloc, multi_conn;
    bool lock_init;
    pthread_rwlock_t rmw_lock; /* only used when align > 1, see header comment */
    VdTlsCreds *tls;          /* NBD over TLS with these credentials (ref held), or NULL */
    char *uri;                /* libnbd's URI (vdisk's own query parameters removed) */
    int64_t reconnect_ms;     /* reconnect-delay: how long commands wait for a lost link */
    int64_t open_timeout_ms;  /* open-timeout: first connection retried this long (0: once) */
    int64_t stall_ms;         /* x-stall-timeout: a silent link with commands outstanding; 0 off */
    char *tcp_cc;             /* x-tcp-congestion: the connections' TCP congestion control */
    NbdIdentity id;           /* the export as the first connection saw it */
    BlockNode *bs;            /* the node (its name for events) */
    pthread_mutex_t fence_lock; /* guards fences (nfences also read atomically, unlocked) */
    NbdFence fences[NBD_MAX_FENCES];
    int nfences;
};

/* Round robin over the connections, passing over those whose link is down (if any is up). */
NbdConn *nbdc_conn_pick(NbdState *s);

/* -errno of the last failed libnbd call on this thread. */
int nbdc_ret(void);

/* libnbd's message without its "nbd_connect_uri: " style function prefix. */
const char *nbdc_msg(void);

/* CLOCK_MONOTONIC, in milliseconds. */
int64_t nbdc_now_ms(void);

/*
 * Whether h's socket is TCP. Extra multi-conn connections are opened only over a local socket
 * (unix, vsock): since commands go through the aio pump, one connection already carries every
 * request in flight, and over TCP more connections are only more flows sharing the same link,
 * each probing for its share. Across a 1 Gbit/s tbf link (+5 ms) a mirror reached 94 MiB/s
 * with one connection and 84 MiB/s with four (medians, one ahead in 4 pairs of 4); QEMU's
 * client uses one.
 */
bool nbdc_conn_is_tcp(struct nbd_handle *h);

/* One connection of node s (its URI, TLS and socket options), see conn_open_uri. */
struct nbd_handle *nbdc_conn_open(NbdState *s, int timeout_ms, int *perr, VdError **errp);

/* Disconnect cleanly (NBD_CMD_DISC) and close h; NULL is a no-op. */
void nbdc_conn_close(struct nbd_handle *h);

/* Free what nbdc_identity_of filled in. */
void nbdc_identity_free(NbdIdentity *id);

/* Everything a connected h says about its export that must not change on a reconnection. */
void nbdc_identity_of(struct nbd_handle *h, NbdIdentity *id);

/* A new connection must serve the same export: NULL if it does, else what differs. */
const char *nbdc_conn_other_export(NbdState *s, struct nbd_handle *h);

/* Take over a connected handle: start its pump. On failure the handle is closed. */
int nbdc_conn_start(NbdState *s, NbdConn *c, struct nbd_handle *h);

/* Stop the pump (no command may be in flight), disconnect cleanly, free. */
void nbdc_conn_stop(NbdConn *c);

/* Wait until no fence covers [off, off+len) (expired fences are dropped). */
void nbdc_fence_wait(NbdState *s, uint64_t off, uint64_t len);

/*
 * op over [off, off+len) as commands of at most `piece` bytes, up to NBD_BATCH in flight at
 * once (buf advances with off; NULL for commands without payload).
 */
int nbdc_run_cmds(NbdConn *c, NbdOp op, uint64_t off, uint64_t len, uint8_t *buf,
                  uint64_t piece, uint32_t flags);

/* One command without a range to split (flush, block status). */
int nbdc_run_one(NbdConn *c, NbdOp op, uint64_t off, uint64_t len, uint32_t flags,
                 nbd_extent_callback *ext);

#endif
