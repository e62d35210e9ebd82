#!/bin/sh
# Entrypoint of the Bloomwire service image.
# Secrets arrive as files (VAR_FILE=/run/secrets/...); the processes want them in VAR.
# Files are mounted 0600 from the host, so read them as root, then drop privileges.
set -eu

for var in BLOOMWIRE_BROKER_PASSWORD PGPASSWORD; do
    file_var="${var}_FILE"
    eval "file=\${$file_var:-}"
    if [ -n "$file" ]; then
        if [ ! -r "$file" ]; then
            echo "bloomwire-entrypoint: $file_var=$file is not readable" >&2
            exit 1
        fi
        value="$(cat "$file")"
        export "$var=$value"
        unset "$file_var"
    fi
done

if [ "$(id -u)" = 0 ]; then
    exec setpriv --reuid=bloomwire --regid=bloomwire --init-groups -- "$@"
fi
exec "$@"
