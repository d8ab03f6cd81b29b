#!/usr/bin/env bash
# Create one virtual environment per peer toolkit under .venvs-peers/<peer> (at the repository root,
# outside the folders tests/test_public_api.py scans), from its pinned
# bench/peers/<peer>/requirements.txt.
#
# Every peer pin here accepts the torch this project is tested with (2.14.1), so instead of a second multi-GB
# copy of torch each peer venv is *layered* on the site-packages that holds the base torch (BASE_PY, default
# the repository's .venv/bin/python): a .pth file appends that directory and the repository's core/ and
# classification/ sources to sys.path. pip sees torch as installed and installs only the peer and the
# dependencies the base does not satisfy, into the peer venv, which comes first on sys.path. A peer whose
# pins need another torch would get its own copy the same way (pip would install it into the peer venv).
#
# Usage: bash bench/peers/setup_venvs.sh [PEER ...]      (default: every folder with a requirements.txt)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
base_py="${BASE_PY:-$repo/.venv/bin/python}"
base_site="$("$base_py" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')"
peers=("$@")
if [ ${#peers[@]} -eq 0 ]; then
  for f in "$here"/*/requirements.txt; do peers+=("$(basename "$(dirname "$f")")"); done
fi
for peer in "${peers[@]}"; do
  venv="$repo/.venvs-peers/$peer"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  printf '%s\n' "$base_site" "$repo/core/src" "$repo/classification/src" > "$site/_qcore_peers_base.pth"
  echo "== $peer: installing $(tr '\n' ' ' < "$here/$peer/requirements.txt")" >&2
  "$venv/bin/pip" install -q -r "$here/$peer/requirements.txt"
done
