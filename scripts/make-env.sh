#!/usr/bin/env bash
# Writes docker/.env for the compose stack from docker/.env.example: every empty value there is a
# secret and gets a fresh random one; everything else is copied. Never overwrites an existing file.
# Usage: scripts/make-env.sh [OUTPUT]   (OUTPUT defaults to docker/.env)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
template="$root/docker/.env.example"
target="${1:-$root/docker/.env}"

fail() { echo "make-env: $*" >&2; exit 1; }

command -v openssl >/dev/null || fail "needs openssl to make the random secrets"
[[ -f "$template" ]] || fail "$template is missing"
# The databases and MinIO keep the secrets they were first started with, so a new file would
# lock the stack out of its own volumes.
[[ -e "$target" ]] && fail "$target exists; not overwriting it. To start over with new secrets: \
docker compose down -v (deletes the databases, buckets and run folders), then delete it."

secret() {  # a random value for the variable named $1
    case "$1" in
        # Airflow's Fernet key: urlsafe base64 of 32 random bytes.
        AIRFLOW_FERNET_KEY) openssl rand -base64 32 | tr '+/' '-_' ;;
        MINIO_ROOT_USER) echo "rltrade-$(openssl rand -hex 6)" ;;
        # Hex is safe in URLs and shells. 160 bits for MinIO, whose secret keys are kept to
        # 40 characters; 256 bits elsewhere (64 bytes, enough for an HS512 JWT key).
        MINIO_ROOT_PASSWORD) openssl rand -hex 20 ;;
        *) openssl rand -hex 32 ;;
    esac
}

content="# Written by scripts/make-env.sh from docker/.env.example. Keep it private: it holds every
# password of the stack.
"
while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ "$line" =~ ^([A-Za-z_][A-Za-z0-9_]*)=$ ]]; then
        name="${BASH_REMATCH[1]}"
        value="$(secret "$name")"
        [[ -n "$value" ]] || fail "could not make a value for $name"
        line="$name=$value"
    fi
    content+="$line"$'\n'
done < "$template"

# Owner-only, and created exclusively: a file that appeared meanwhile is not replaced.
umask 077
set -o noclobber
printf '%s' "$content" > "$target" || fail "could not create $target"
echo "make-env: wrote $target"
