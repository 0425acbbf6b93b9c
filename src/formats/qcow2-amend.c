/*
 * qcow2-amend.c - qemu-img amend for qcow2 (the vtable's amend): compat 0.10 <-> 1.1,
 * lazy_refcounts, refcount_bits. The driver state is closed (caches written, dirty bit cleared),
 * the file is changed step by step, each step leaving a consistent image, and the state is opened
 * again. Order as QEMU's: upgrade, refcount width, lazy refcounts, downgrade last.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2-check.h"
#include "formats/qcow2.h"

/* Version 3's header length as vdisk writes it (with the compression type byte). */
static void set_v3_defaults(Qcow2State *s)
{
    s->h.version = 3;
    s->h.header_length = Q2_V3_HEADER_LEN_CT;
    s->h.refcount_order = 4;
    s->h.incompatible_features = 0;
    s->h.compatible_features = 0;
    s->h.autoclear_features = 0;
    s->compression_type = QCOW2_COMPRESSION_ZLIB;
    free(s->hdr_raw); /* a version 2 header has no fields to keep */
    s->hdr_raw = NULL;
    s->hdr_raw_len = 0;
}

/* Rewrite the header cluster from s (open state, no request in flight). */
static int rewrite_header(Qcow2State *s)
{
    /* type 0 is the end marker: no extension of that type exists, so only the rewrite happens */
    return q2_update_header_ext(s, QCOW2_EXT_END, NULL, 0, s->h.autoclear_features);
}

/* Header changes on the open state: version, lazy refcounts, the data file's name and raw bit. */
static int amend_header(BlockNode *bs, int version, int lazy, const VdAmendOptions *o,
                        VdError **errp)
{
    Qcow2State *s = q2_state(bs);
    int ret = 0;
    if (o && o->data_file_raw == 0) {
        s->h.autoclear_features &= ~QCOW2_AUTOCLEAR_DATA_FILE_RAW;
        s->data_file_raw = false;
    }
    if (o && o->data_file) {
        /* "" drops the name: the image then opens only with a data-file option (as QEMU) */
        ret = q2_update_header_ext(s, QCOW2_EXT_DATA_FILE,
                                   *o->data_file ? (const uint8_t *)o->data_file : NULL,
                                   (uint32_t)strlen(o->data_file), s->h.autoclear_features);
    }
    if (version == 3 && s->h.version == 2) {
        set_v3_defaults(s);
        ret = q2_add_feature_table(s);
    } else if (version == 2 && s->h.version == 3) {
        s->h.version = 2;
        s->h.autoclear_features = 0;
        /* version 2 has no feature table; the bitmaps extension was refused before */
        ret = q2_update_header_ext(s, QCOW2_EXT_FEATURE_TABLE, NULL, 0, 0);
    }
    if (ret == 0 && lazy >= 0 && s->h.version >= 3) {
        if (lazy) {
            s->h.compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS;
        } else {
            s->h.compatible_features &= ~QCOW2_COMPAT_LAZY_REFCOUNTS;
        }
    }
    if (ret == 0) {
        ret = rewrite_header(s);
    }
    if (ret < 0) {
        vd_error_setg_errno(errp, -ret, "Could not update the image header");
    }
    return ret;
}

/*
 * QEMU's progress over several operations (qcow2_amend_helper_cb): each operation reports
 * (done, total) of its own; the caller sees them one after another, the operations still to
 * come projected to cost as much as the average of those begun.
 */
enum { AMEND_NONE, AMEND_UPGRADE, AMEND_REFCOUNT, AMEND_DOWNGRADE };
typedef struct AmendSteps {
    const VdAmendOptions *o;
    int ops, ops_done, op, last_op;
    uint64_t done_before, last_total;
} AmendSteps;

static void amend_step(AmendSteps *st, int op, uint64_t done, uint64_t total)
{
    if (!st->o->progress) {
        return;
    }
    st->op = op;
    if (st->op != st->last_op) {
        if (st->last_op != AMEND_NONE) {
            st->done_before += st->last_total;
            st->ops_done++;
        }
        st->last_op = st->op;
    }
    st->last_total = total;
    uint64_t cur = st->done_before + total;
    uint64_t left = (uint64_t)(st->ops - st->ops_done - 1), begun = (uint64_t)(st->ops_done + 1);
    uint64_t projected = cur * left / begun;
    st->o->progress(st->o->opaque, st->done_before + done, cur + projected);
}

static void step_refcount(void *opaque, uint64_t done, uint64_t total)
{
    amend_step(opaque, AMEND_REFCOUNT, done, total);
}

static void step_downgrade(void *opaque, uint64_t done, uint64_t total)
{
    amend_step(opaque, AMEND_DOWNGRADE, done, total);
}

/* Refusals, in QEMU's words, before anything changes. */
static int amend_check(Qcow2State *s, const VdAmendOptions *o, int version, int rbits,
                       VdError **errp)
{
    if (o->data_file && !s->has_data_file) {
        vd_error_setg(errp, EINVAL, "data-file can only be set for images that use an external "
                      "data file");
        return -EINVAL;
    }
    if (o->data_file && strlen(o->data_file) > 1023) {
        vd_error_setg(errp, EINVAL, "data-file name too long");
        return -EINVAL;
    }
    if (o->data_file_raw == 1 && !s->data_file_raw) {
        vd_error_setg(errp, EINVAL, "data-file-raw cannot be set on existing images");
        return -EINVAL;
    }
    if (version < 3 && o->lazy_refcounts == 1) {
        vd_error_setg(errp, EINVAL, "Lazy refcounts only supported with compatibility level "
                      "1.1 and above (use compat=1.1 or greater)");
        return -EINVAL;
    }
    if (version < 3 && o->refcount_bits && o->refcount_bits != 16) {
        vd_error_setg(errp, EINVAL, "Refcount widths other than 16 bits require compatibility "
                      "level 1.1 or above (use compat=1.1 or greater)");
        return -EINVAL;
    }
    if (version < 3 && rbits != 16) {
        vd_error_setg(errp, EINVAL, "compat=0.10 requires refcount_bits=16");
        return -EINVAL;
    }
    if (version < 3 && s->h.version >= 3) {
        uint64_t incompat = s->h.incompatible_features &
                            ~(QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_COMPRESSION);
        if (incompat) {
            vd_error_setg(errp, ENOTSUP, "Cannot downgrade an image with incompatible features "
                          "0x%" PRIx64 " set", incompat);
            return -ENOTSUP;
        }
        for (int i = 0; i < s->nb_exts; i++) {
            if (s->exts[i].type == QCOW2_EXT_BITMAPS) {
                /* QEMU leaves them to be found inconsistent; vdisk refuses to drop them */
                vd_error_setg(errp, ENOTSUP, "Cannot downgrade an image with persistent dirty "
                              "bitmaps (remove them first)");
                return -ENOTSUP;
            }
        }
    }
    return 0;
}

int q2_amend(BlockNode *bs, const VdAmendOptions *o, VdError **errp)
{
    Qcow2State *s = q2_state(bs);
    int old_version = (int)s->h.version;
    int version = old_version;
    if (o->compat) {
        version = !strcmp(o->compat, "0.10") || !strcmp(o->compat, "v2") ? 2 : 3;
    }
    int old_bits = 1 << s->h.refcount_order;
    int rbits = o->refcount_bits ? o->refcount_bits : old_bits;
    if (s->damaged) {
        vd_error_setg(errp, EIO, "The image is damaged: repair it with 'check -r all' first");
        return -EIO;
    }
    int ret = amend_check(s, o, version, rbits, errp);
    if (ret < 0) {
        return ret;
    }
    AmendSteps st = { .o = o, .ops = (version != old_version) + (rbits != old_bits) };
    /* From here on the file is changed with the driver state closed (flushed, not dirty). */
    q2_close_state(bs);
    if (version == 3 && old_version == 2) {
        amend_step(&st, AMEND_UPGRADE, 0, 2); /* QEMU's: snapshot table, header, done */
        ret = q2_open_state(bs, errp);
        if (ret == 0) {
            amend_step(&st, AMEND_UPGRADE, 1, 2);
            ret = amend_header(bs, 3, -1, NULL, errp);
            q2_close_state(bs);
        }
        if (ret < 0) {
            goto reopen;
        }
        amend_step(&st, AMEND_UPGRADE, 2, 2);
    }
    if (rbits != old_bits || version < old_version) {
        Qcow2AmendFile a = {
            .refcount_bits = (uint32_t)rbits,
            .expand_zeroes = version < old_version,
            .has_backing = bs->backing_file != NULL,
            .progress = step_downgrade,
            .refcount_progress = step_refcount,
            .opaque = &st,
        };
        ret = qcow2_amend_file(bs->file, &a, errp);
        if (ret < 0) {
            goto reopen;
        }
    }
    if (version < old_version || o->lazy_refcounts >= 0 || o->data_file || o->data_file_raw >= 0) {
        ret = q2_open_state(bs, errp);
        if (ret == 0) {
            ret = amend_header(bs, version, o->lazy_refcounts, o, errp);
            q2_close_state(bs);
        }
    }
reopen:;
    VdError *err = NULL;
    int r = q2_open_state(bs, ret < 0 ? &err : errp);
    vd_error_free(err);
    return ret < 0 ? ret : r;
}
