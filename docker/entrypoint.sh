#!/bin/sh
# Entry point of the policylink server image: choose the configuration, then exec the server.
#
#   (no arguments)      policylink serve --config $POLICYLINK_CONFIG   when that file exists,
#                       policylink serve                               otherwise (POLICYLINK_* variables only)
#   --flag ...          the same, with these flags added (flags override the file and the environment)
#   COMMAND ...         run COMMAND as given (e.g. `policylink status ws://127.0.0.1:8000`, `bash`)
#
# POLICYLINK_CONFIG defaults to /config/server.yaml, where compose.yaml mounts configs/server.yaml.
# Setting it to a file that does not exist is an error, not a silent start with defaults.
# `exec` replaces this shell, so the server gets SIGTERM itself (from tini, PID 1 in the image)
# and drains its running requests before it exits.
set -eu

default_config=/config/server.yaml
config="${POLICYLINK_CONFIG:-$default_config}"

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi
if [ -f "$config" ]; then
    exec policylink serve --config "$config" "$@"
fi
if [ "$config" != "$default_config" ]; then
    echo "policylink-entrypoint: POLICYLINK_CONFIG=$config: no such file" >&2
    exit 2
fi
exec policylink serve "$@"
