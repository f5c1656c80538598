#!/usr/bin/env bash
# Debian packages the test suite starts for real: Orthanc (+ Python and DICOMweb plugins) as the PACS,
# dcmtk's storescu as the modality (and dcmcjpeg, the JPEG Lossless SV1 test encoder), openjph-tools'
# ojph_compress (the HTJ2K test encoder), openssl for test certificates. Idempotent: installs only what is missing.
set -euo pipefail
packages=(orthanc orthanc-python orthanc-dicomweb dcmtk openjph-tools openssl procps)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "error: missing Debian packages ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
# nothing starts on install: the tests start Orthanc themselves on 127.0.0.1 and stop it by PID
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
