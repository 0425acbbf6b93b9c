/*
 * qmp-commands-core.c - the monitor's own commands: query-version, query-commands, quit, and the
 * query-commands entry of qmp_capabilities (which the server itself handles per client).
 * Handlers run on the QMP thread; they only read the registry through the server's accessors.
 */
#include <errno.h>

#include "qmp/qmp-args.h"
#include "qmp/qmp-internal.h"

static json_t *cmd_query_version(json_t *args, VdError **errp)
{
    json_t *v = qmp_version_object();
    if (!v) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
    }
    return v;
}

static json_t *cmd_query_commands(json_t *args, VdError **errp)
{
    json_t *v = qmp_command_list();
    if (!v) {
        vd_error_setg(errp, ENOMEM, "Out of memory");
    }
    return v;
}

/* The server acts on a successful "quit" after the reply is sent (qmp-server.c). */
static json_t *cmd_quit(json_t *args, VdError **errp)
{
    return json_object();
}

/* Never called: the server answers qmp_capabilities itself (it needs the client's state). */
static json_t *cmd_qmp_capabilities(json_t *args, VdError **errp)
{
    vd_error_setg(errp, EINVAL, "Capabilities negotiation is already complete, command ignored");
    return NULL;
}

void qmp_commands_core_register(void)
{
    qmp_register_command("qmp_capabilities", qmp_no_args, cmd_qmp_capabilities);
    qmp_register_command("query-version", qmp_no_args, cmd_query_version);
    qmp_register_command("query-commands", qmp_no_args, cmd_query_commands);
    qmp_register_command("quit", qmp_no_args, cmd_quit);
}
