/*
 * graph.c - vdiskd's named block nodes (see graph.h): the registry blockdev-add (qmp-blockdev.c)
 * fills, blockdev-del, lookup by node-name, one writer per host file. The registry holds the
 * monitor-owned roots, one reference each; children (file, backing) are reached through the nodes
 * themselves, so lookups see every node in the daemon. QMP thread (or startup) only: block jobs
 * hand their graph changes to the QMP thread (job_set_host), so the registry needs no lock.
 */
#include "block/graph.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>


static BlockNode **roots;
static size_t nroots, roots_cap;
/* The roots graph_register added (a subset of roots; no reference of their own). */
static BlockNode **implicit;
static size_t nimplicit, implicit_cap;

/* ---- lookup ---- */

static BlockNode *find_below(BlockNode *bs, const char *name, int depth)
{
    /* Chains are built without loops (block.c checks); depth bounds a corrupted graph anyway. */
    while (bs && depth < 4096) {
        if (bs->node_name && !strcmp(bs->node_name, name)) {
            return bs;
        }
        BlockNode *f = bs->file ? find_below(bs->file, name, depth + 1) : NULL;
        if (f) {
            return f;
        }
        bs = bs->backing;
        depth++;
    }
    return NULL;
}

BlockNode *graph_find_node(const char *node_name)
{
    if (!node_name) {
        return NULL;
    }
    for (size_t i = 0; i < nroots; i++) {
        if (roots[i]->node_name && !strcmp(roots[i]->node_name, node_name)) {
            return roots[i];
        }
    }
    for (size_t i = 0; i < nroots; i++) {
        BlockNode *bs = find_below(roots[i], node_name, 0);
        if (bs) {
            return bs;
        }
    }
    return NULL;
}

static ssize_t root_index(BlockNode *bs)
{
    for (size_t i = 0; i < nroots; i++) {
        if (roots[i] == bs) {
            return (ssize_t)i;
        }
    }
    return -1;
}

/* Room for one more entry in a node array (*v, n used of *cap). */
static int nodes_reserve(BlockNode ***v, size_t n, size_t *cap, VdError **errp)
{
    if (n < *cap) {
        return 0;
    }
    size_t nc = *cap ? *cap * 2 : 16;
    BlockNode **nv = realloc(*v, nc * sizeof(**v));
    if (!nv) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
        return -ENOMEM;
    }
    *v = nv;
    *cap = nc;
    return 0;
}

static int roots_append(BlockNode *bs, VdError **errp)
{
    int r = nodes_reserve(&roots, nroots, &roots_cap, errp);
    if (r == 0) {
        roots[nroots++] = bs;
    }
    return r;
}

int graph_register(BlockNode *node, VdError **errp)
{
    if (!node || !node->node_name) {
        vd_error_setg(errp, EINVAL, "A node needs a node-name to be registered");
        return -EINVAL;
    }
    if (root_index(node) >= 0) {
        return 0; /* already monitor-owned: keep the single reference */
    }
    BlockNode *other = graph_find_node(node->node_name);
    if (other && other != node) {
        vd_error_setg(errp, EEXIST, "Duplicate nodes with node-name='%s'", node->node_name);
        return -EEXIST;
    }
    int r = nodes_reserve(&implicit, nimplicit, &implicit_cap, errp);
    if (r == 0) {
        r = roots_append(node, errp);
    }
    if (r == 0) {
        vd_node_ref(node);
        implicit[nimplicit++] = node;
    }
    return r;
}

static ssize_t implicit_index(BlockNode *bs)
{
    for (size_t i = 0; i < nimplicit; i++) {
        if (implicit[i] == bs) {
            return (ssize_t)i;
        }
    }
    return -1;
}

/* Remove roots[idx] (and its implicit mark) and drop the registry's reference. */
static void root_remove(size_t idx)
{
    BlockNode *bs = roots[idx];
    memmove(&roots[idx], &roots[idx + 1], (nroots - idx - 1) * sizeof(*roots));
    nroots--;
    ssize_t k = implicit_index(bs);
    if (k >= 0) {
        implicit[k] = implicit[--nimplicit];
    }
    vd_node_unref(bs);
}

void graph_replace_node(BlockNode *old, BlockNode *new_node)
{
    ssize_t idx = old && new_node && old != new_node ? root_index(old) : -1;
    if (idx < 0) {
        return;
    }
    vd_node_ref(new_node);
    roots[idx] = new_node;
    ssize_t k = implicit_index(old);
    if (k >= 0) {
        implicit[k] = new_node;
    }
    vd_node_unref(old);
}

void graph_foreach(void (*cb)(BlockNode *node, void *opaque), void *opaque)
{
    for (size_t i = 0; i < nroots; i++) {
        cb(roots[i], opaque);
    }
}

void graph_close_all(void)
{
    /* Newest first: later nodes may sit on top of earlier ones (refcounts make any order safe). */
    while (nroots > 0) {
        BlockNode *bs = roots[--nroots];
        vd_flush(bs);
        vd_node_unref(bs);
    }
    free(roots);
    roots = NULL;
    roots_cap = 0;
    free(implicit);
    implicit = NULL;
    nimplicit = implicit_cap = 0;
}

/* ---- sharing: one host file, one writer (the block layer ignores this process's own locks) ---- */

typedef struct FileUse {
    dev_t dev;
    ino_t ino;
    bool writable;
    BlockNode *node; /* the format node using the file */
} FileUse;

typedef struct UseList {
    FileUse *v;
    size_t n, cap;
} UseList;

static bool host_file_id(BlockNode *file, dev_t *dev, ino_t *ino)
{
    struct stat st;
    if (!file || !file->drv || strcmp(file->drv->name, "file") != 0 || !file->filename ||
        stat(file->filename, &st) < 0) {
        return false;
    }
    *dev = st.st_dev;
    *ino = st.st_ino;
    return true;
}

static void uses_add(UseList *l, BlockNode *bs, int depth)
{
    for (; bs && depth < 4096; bs = bs->backing, depth++) {
        if (bs->file) {
            dev_t dev;
            ino_t ino;
            bool seen = false;
            for (size_t i = 0; i < l->n && !seen; i++) {
                seen = l->v[i].node == bs;
            }
            if (!seen && !(bs->open_flags & VD_OPEN_FORCE_SHARE) &&
                host_file_id(bs->file, &dev, &ino)) {
                if (l->n == l->cap) {
                    size_t nc = l->cap ? l->cap * 2 : 16;
                    FileUse *n = realloc(l->v, nc * sizeof(*n));
                    if (!n) {
                        return; /* best effort: the check is a guard, not the source of truth */
                    }
                    l->v = n;
                    l->cap = nc;
                }
                l->v[l->n++] = (FileUse){dev, ino, !bs->read_only, bs};
            }
            uses_add(l, bs->file, depth + 1);
        }
    }
}

/*
 * Refuse a format node (or a whole new tree) that would share a host file with another format
 * node of the daemon when either writes: two qcow2 nodes on one file corrupt each other's
 * metadata, and writing under a live backing file changes what its overlays read. QEMU refuses
 * these with its permission system ("Failed to get "write" lock").
 */
static int check_sharing(BlockNode *candidate, BlockNode *file_of_new, bool new_writable,
                         VdError **errp)
{
    UseList have = {0}, add = {0};
    for (size_t i = 0; i < nroots; i++) {
        uses_add(&have, roots[i], 0);
    }
    if (candidate) {
        uses_add(&add, candidate, 0);
    } else {
        dev_t dev;
        ino_t ino;
        if (host_file_id(file_of_new, &dev, &ino)) {
            add.v = malloc(sizeof(*add.v));
            if (add.v) {
                add.v[0] = (FileUse){dev, ino, new_writable, NULL};
                add.n = 1;
            }
        }
    }
    int r = 0;
    for (size_t i = 0; i < add.n && !r; i++) {
        for (size_t k = 0; k < have.n && !r; k++) {
            FileUse *a = &add.v[i], *h = &have.v[k];
            if (a->node == h->node || a->dev != h->dev || a->ino != h->ino ||
                (!a->writable && !h->writable)) {
                continue;
            }
            vd_error_setg(errp, EBUSY, "Failed to get %s\"write\" lock: '%s' is in use by "
                          "node '%s'", a->writable ? "" : "shared ",
                          h->node->file->filename, h->node->node_name ? h->node->node_name
                                                                      : "");
            r = -EBUSY;
        }
    }
    free(have.v);
    free(add.v);
    return r;
}

int graph_check_sharing(BlockNode *file, bool writable, VdError **errp)
{
    return check_sharing(NULL, file, writable, errp);
}

int graph_add_root(BlockNode *bs, VdError **errp)
{
    /* The whole new tree, backing files opened from image headers included. */
    int r = check_sharing(bs, NULL, false, errp);
    if (r < 0) {
        return r;
    }
    return roots_append(bs, errp);
}

static void walk_all(void (*cb)(BlockNode *n, void *opaque), void *opaque);

typedef struct ParentOf {
    BlockNode *bs, *parent;
    bool as_backing;
} ParentOf;

static void parent_visit(BlockNode *n, void *opaque)
{
    ParentOf *p = opaque;
    if (!p->parent && (n->backing == p->bs || n->file == p->bs || n->data_file == p->bs)) {
        p->parent = n;
        p->as_backing = n->backing == p->bs;
    }
}

/* Who holds bs as a child? Sets *parent and whether it is the backing link. */
static bool find_parent(BlockNode *bs, BlockNode **parent, bool *as_backing)
{
    ParentOf p = {.bs = bs};
    walk_all(parent_visit, &p);
    *parent = p.parent;
    *as_backing = p.as_backing;
    return p.parent != NULL;
}

int graph_blockdev_del(const char *node_name, VdError **errp)
{
    BlockNode *bs = graph_find_node(node_name);
    ssize_t idx = bs ? root_index(bs) : -1;
    if (!bs) {
        /* ENXIO: neither ENOENT nor ENODEV, which the QMP server reports as other classes. */
        vd_error_setg(errp, ENXIO, "Failed to find node with node-name='%s'",
                      node_name ? node_name : "");
        return -ENXIO;
    }
    if (idx < 0) {
        vd_error_setg(errp, EINVAL, "Node %s is not owned by the monitor", node_name);
        return -EINVAL;
    }
    BlockNode *parent = NULL;
    bool as_backing = false;
    if (find_parent(bs, &parent, &as_backing)) {
        if (as_backing) {
            vd_error_setg(errp, EBUSY, "Node '%s' is busy: node is used as backing hd of '%s'",
                          node_name, parent->node_name ? parent->node_name : "");
        } else {
            vd_error_setg(errp, EBUSY, "Block device %s is in use", node_name);
        }
        return -EBUSY;
    }
    if (__atomic_load_n(&bs->refcnt, __ATOMIC_ACQUIRE) > 1) {
        vd_error_setg(errp, EBUSY, "Node '%s' is busy: node is in use by an export or a job",
                      node_name);
        return -EBUSY;
    }
    root_remove((size_t)idx);
    return 0;
}

int graph_unregister(BlockNode *node)
{
    ssize_t idx = node ? root_index(node) : -1;
    if (idx < 0) {
        return -ENOENT;
    }
    BlockNode *parent = NULL;
    bool as_backing = false;
    if (find_parent(node, &parent, &as_backing)) {
        return -EBUSY; /* still reachable (and named) through another node: keep it */
    }
    root_remove((size_t)idx);
    return 0;
}

void graph_drop_implicit(BlockNode *node)
{
    if (node && implicit_index(node) >= 0) {
        graph_unregister(node);
    }
}

BlockNode *graph_backing_parent(BlockNode *bs)
{
    BlockNode *parent = NULL;
    bool as_backing = false;
    return bs && find_parent(bs, &parent, &as_backing) && as_backing ? parent : NULL;
}

/*
 * Calls cb(n, opaque) for every node of every registered tree (a node reachable twice: twice), each
 * root's tree iteratively over backing, recursively over file.
 */
static void walk_all(void (*cb)(BlockNode *n, void *opaque), void *opaque)
{
    for (size_t i = 0; i < nroots; i++) {
        BlockNode *stack[64];
        int sp = 0;
        stack[sp++] = roots[i];
        while (sp > 0) {
            BlockNode *n = stack[--sp];
            for (int depth = 0; n && depth < 4096; depth++) {
                cb(n, opaque);
                if (n->file && sp < 64) {
                    stack[sp++] = n->file;
                }
                n = n->backing;
            }
        }
    }
}

typedef struct Ancestors {
    BlockNode **v;
    size_t n, cap;
    bool grew, oom;
} Ancestors;

static bool ancestors_has(const Ancestors *a, BlockNode *bs)
{
    for (size_t i = 0; i < a->n; i++) {
        if (a->v[i] == bs) {
            return true;
        }
    }
    return false;
}

/* n is above the set's members (or bs, a->v[0] while collecting): add it. */
static void ancestors_visit(BlockNode *n, void *opaque)
{
    Ancestors *a = opaque;
    if (a->oom || ancestors_has(a, n) ||
        !((n->file && ancestors_has(a, n->file)) || (n->backing && ancestors_has(a, n->backing)))) {
        return;
    }
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 8;
        BlockNode **v = realloc(a->v, cap * sizeof(*v));
        if (!v) {
            a->oom = true;
            return;
        }
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = n;
    a->grew = true;
}

int graph_ancestors(BlockNode *bs, BlockNode ***out, size_t *n)
{
    Ancestors a = {.v = malloc(8 * sizeof(BlockNode *)), .cap = 8};
    *out = NULL;
    *n = 0;
    if (!a.v) {
        return -ENOMEM;
    }
    a.v[a.n++] = bs;
    /* Until no new parent shows up: the trees are small, a pass each level is cheap. */
    do {
        a.grew = false;
        walk_all(ancestors_visit, &a);
    } while (a.grew && !a.oom);
    if (a.oom) {
        free(a.v);
        return -ENOMEM;
    }
    memmove(a.v, a.v + 1, (a.n - 1) * sizeof(*a.v));
    if (a.n == 1) {
        free(a.v);
        a.v = NULL;
    }
    *out = a.v;
    *n = a.n - 1;
    return 0;
}

typedef struct Repoint {
    BlockNode *from, *to, *skip;
} Repoint;

/* Does `from` reach n through its children (itself included)? Bounded as the chains are. */
static bool reaches(BlockNode *from, BlockNode *n, int depth)
{
    for (; from && depth < 4096; from = from->backing, depth++) {
        if (from == n || (from->file && reaches(from->file, n, depth + 1)) ||
            (from->data_file && reaches(from->data_file, n, depth + 1))) {
            return true;
        }
    }
    return false;
}

static void repoint_visit(BlockNode *n, void *opaque)
{
    Repoint *r = opaque;
    /*
     * A parent `to` reaches keeps its child (QEMU's should_update_child): a target whose own
     * chain holds the source (target -> mid -> source) must not become mid's backing (a loop).
     */
    if (n == r->skip || reaches(r->to, n, 0)) {
        return;
    }
    if (n->backing == r->from) {
        vd_node_set_backing(n, r->to);
    }
    if (n->file == r->from) {
        vd_node_ref(r->to);
        n->file = r->to;
        vd_node_unref(r->from);
    }
}

void graph_repoint_parents(BlockNode *from, BlockNode *to, BlockNode *skip)
{
    Repoint r = {.from = from, .to = to, .skip = skip};
    walk_all(repoint_visit, &r);
}

int graph_drain_writers(BlockNode *bs, BlockNode *skip, GraphDrained *d)
{
    BlockNode **up = NULL;
    size_t n = 0;
    *d = (GraphDrained){0};
    int r = graph_ancestors(bs, &up, &n);
    if (r == 0) {
        r = vd_node_users_drain(bs, &d->own);
    }
    for (size_t i = 0; i < n && r == 0; i++) {
        if (up[i] != skip) {
            r = vd_node_users_drain_more(up[i], &d->above);
        }
    }
    free(up);
    if (r < 0) {
        graph_resume_writers(d, NULL);
    }
    return r;
}

void graph_resume_writers(GraphDrained *d, BlockNode *to)
{
    vd_node_users_resume(&d->above, NULL);
    vd_node_users_resume(&d->own, to);
}
