/*
 * claims.c - the registry of nodes held by block jobs (claims.h): a list of (node, owner, type)
 * under one mutex. A claim of several nodes is checked and added under the lock in one go, so two
 * jobs starting at once cannot both get a node.
 */
#include "block/claims.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>

#include "util/lock.h"

typedef struct Claim {
    const BlockNode *node;
    const void *owner;
    const char *type;
} Claim;

static pthread_mutex_t claims_lock = PTHREAD_MUTEX_INITIALIZER;
static Claim *claims; /* claims_lock */
static size_t nclaims, claims_cap;

/* claims_lock held. */
static const Claim *find_claim(const BlockNode *node)
{
    for (size_t i = 0; i < nclaims; i++) {
        if (claims[i].node == node) {
            return &claims[i];
        }
    }
    return NULL;
}

int vd_claim_nodes(const void *owner, const char *job_type, BlockNode *const *nodes, size_t n,
                   VdError **errp)
{
    vd_mutex_lock(&claims_lock);
    for (size_t i = 0; i < n; i++) {
        const Claim *c = nodes[i] ? find_claim(nodes[i]) : NULL;
        if (c) {
            vd_error_setg(errp, EBUSY, "Node '%s' is busy: block device is in use by block job: "
                          "%s", nodes[i]->node_name, c->type);
            vd_mutex_unlock(&claims_lock);
            return -EBUSY;
        }
    }
    if (nclaims + n > claims_cap) {
        size_t cap = (nclaims + n) * 2;
        Claim *v = realloc(claims, cap * sizeof(*v));
        if (!v) {
            vd_mutex_unlock(&claims_lock);
            vd_error_setg(errp, ENOMEM, "Out of memory");
            return -ENOMEM;
        }
        claims = v;
        claims_cap = cap;
    }
    for (size_t i = 0; i < n; i++) {
        if (nodes[i]) {
            claims[nclaims++] = (Claim){nodes[i], owner, job_type};
        }
    }
    vd_mutex_unlock(&claims_lock);
    return 0;
}

void vd_release_claims(const void *owner)
{
    vd_mutex_lock(&claims_lock);
    size_t k = 0;
    for (size_t i = 0; i < nclaims; i++) {
        if (claims[i].owner != owner) {
            claims[k++] = claims[i];
        }
    }
    nclaims = k;
    vd_mutex_unlock(&claims_lock);
}

const char *vd_claimed_by(const BlockNode *node)
{
    vd_mutex_lock(&claims_lock);
    const Claim *c = find_claim(node);
    const char *type = c ? c->type : NULL;
    vd_mutex_unlock(&claims_lock);
    return type;
}
