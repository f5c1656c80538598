#!/usr/bin/env bash
# Prints the Debian archive URI this machine's apt already uses (deb822 .sources first, then sources.list),
# so no script hard-codes a mirror. MPMRI_DEBIAN_MIRROR overrides it.
set -euo pipefail
if [[ -n "${MPMRI_DEBIAN_MIRROR:-}" ]]; then echo "$MPMRI_DEBIAN_MIRROR"; exit 0; fi
uri=$(grep -hE '^[[:space:]]*URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v -- '-security' | head -n 1 || true)
if [[ -z "$uri" ]]; then
  uri=$(grep -hE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | grep -v -- '-security' | awk '{print $2}' | head -n 1 || true)
fi
[[ -n "$uri" ]] || { echo "error: no Debian archive in this machine's apt sources (set MPMRI_DEBIAN_MIRROR)" >&2; exit 1; }
echo "$uri"
