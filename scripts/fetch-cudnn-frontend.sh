#!/usr/bin/env bash
# Fetches NVIDIA's header-only cudnn-frontend (MIT licence) into .deps/cudnn-frontend/include, where
# CMake looks for it. The cudnn backend builds its SDPA graphs with it; without it the backend is
# left out (the build says so). Pinned version; a second run only checks. Needs pip and network
# once; GPU machines get the folder copied with the source tree.
set -euo pipefail
VERSION=${CUDNN_FRONTEND_VERSION:-1.32.0}
DEST=${1:-$(cd "$(dirname "$0")/.." && pwd)/.deps/cudnn-frontend}
if [ -f "$DEST/include/cudnn_frontend.h" ] && [ "$(cat "$DEST/VERSION" 2>/dev/null)" = "$VERSION" ]; then
  exit 0
fi
if ! command -v unzip >/dev/null && ! command -v python3 >/dev/null; then
  echo "fetch-cudnn-frontend: needs python3 or unzip; the cudnn backend will be left out" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The wheel carries the C++ headers under include/; any platform tag works for headers.
if ! python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
     --platform manylinux_2_28_x86_64 "nvidia-cudnn-frontend==$VERSION" -d "$tmp" >"$tmp/pip.log" 2>&1; then
  echo "fetch-cudnn-frontend: pip download of nvidia-cudnn-frontend==$VERSION failed (no network?);" \
       "the cudnn backend will be left out. Log:" >&2
  tail -3 "$tmp/pip.log" >&2
  exit 1
fi
rm -rf "$DEST" && mkdir -p "$DEST"
python3 - "$tmp"/*.whl "$DEST" <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.startswith("include/")]
    z.extractall(dest, members)
    licences = [m for m in z.namelist() if m.upper().endswith("LICENSE.TXT") or m.upper().endswith("LICENSE")]
    z.extractall(dest, licences)
PY
echo "$VERSION" > "$DEST/VERSION"
echo "fetch-cudnn-frontend: cudnn-frontend $VERSION headers in $DEST/include"
