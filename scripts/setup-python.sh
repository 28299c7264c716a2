#!/usr/bin/env bash
# Installs the longattn Python package and its test dependencies into .venv/ at the repository root
# (so that `.venv/bin/python -c "import longattn.torch"` works), linking the library already built
# in BUILD (default build/) instead of compiling it again. Usage: scripts/setup-python.sh [BUILD]
#
# torch comes from PyPI as published: its Linux wheel brings the CUDA libraries (several GB). The
# wheels are kept in a wheelhouse under pip's cache folder (LONGATTN_WHEELHOUSE overrides it) and
# installed from there without the network once present: pip's own HTTP cache cannot be relied on
# to keep them (it skips caching silently on any error).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="$(cd "${1:-$root/build}" && pwd)"
venv="$root/.venv"

python=""
for candidate in python3 /usr/bin/python3; do
  if command -v "$candidate" >/dev/null && "$candidate" -c "import sys, venv; sys.exit(sys.version_info < (3, 9))" 2>/dev/null; then
    python="$candidate"
    break
  fi
done
if [ -z "$python" ]; then
  echo "setup-python: no Python >= 3.9 with the venv module: apt-get install python3-venv" >&2
  exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv" || { echo "setup-python: could not make $venv: apt-get install python3-venv" >&2; exit 1; }
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
requirements=("torch>=2.4" "pytest>=7" numpy)
wheelhouse="${LONGATTN_WHEELHOUSE:-$HOME/.cache/pip/longattn-wheels}"
mkdir -p "$wheelhouse"
if ! "$venv/bin/python" -m pip install --quiet --no-index --find-links "$wheelhouse" "${requirements[@]}" 2>/dev/null; then
  echo "setup-python: downloading torch and the test packages from PyPI into $wheelhouse (several GB, once)"
  "$venv/bin/python" -m pip download --quiet --dest "$wheelhouse" "${requirements[@]}"
  "$venv/bin/python" -m pip install --quiet --no-index --find-links "$wheelhouse" "${requirements[@]}"
fi

# The library as `cmake --install` lays it out, from the build that `make` just made.
prefix="$build/python-library"
cmake --install "$build" --prefix "$prefix" >/dev/null
"$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "$root/python" \
  -C cmake.define.LONGATTN_LIBRARY_PREFIX="$prefix"
"$venv/bin/python" -c "import longattn.torch, torch; print('setup-python: longattn', longattn.__version__, 'with torch', torch.__version__, 'in $venv')"
