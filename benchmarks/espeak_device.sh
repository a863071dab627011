#!/usr/bin/env bash
# Build the spoken-digits clip set (`mambakit data spoken-digits`) on the lent GPU machine, which has no espeak-ng
# and no network, from espeak-ng's Debian packages carried in .espeak/; the set lands where `mambakit reproduce
# spoken-digits` and `mambakit reproduce audio-context` read it (`default_root()`: $MAMBAKIT_DATA/spoken-digits,
# else ~/.cache/mambakit/spoken-digits, i.e. /root/.cache/mambakit/spoken-digits there).
#
# Usage (repository root, on the GPU machine; carry .espeak, and the same command then runs the experiment, since a
# fresh machine has neither the set nor espeak-ng):
#   bash benchmarks/espeak_device.sh && bash benchmarks/gpu_all.sh reproduce-spoken-digits pack
# Knobs (environment): JOBS (espeak-ng processes at once, `mambakit data spoken-digits --jobs`, default the cores;
# the set does not depend on it), SPEAKERS (default all 280), TAKES (default 2), SEED (default 0), FORCE=1 (rebuild
# even if a complete set is there), PYTHON (default python3), ESPEAK_PREFIX (where the packages unpack, default
# /tmp/espeak), OUT (a log goes to $OUT/espeak-data.log, default /tmp/out), MAMBAKIT_DATA (as for mambakit).
#
# Needs: the 31 .deb files in .espeak/ (9,958,404 bytes), Debian 12 "bookworm" amd64, fetched on a dev machine with
#   mkdir -p .espeak && cd .espeak && apt-get download espeak-ng libespeak-ng1 espeak-ng-data libpcaudio0 \
#     libsonic0 libasound2 libpulse0 libasyncns0 libdbus-1-3 libsndfile1 libflac12 libmp3lame0 libmpg123-0 \
#     libogg0 libopus0 libvorbis0a libvorbisenc2 libx11-6 libx11-xcb1 libxcb1 libxau6 libxdmcp6 libbsd0 libmd0 \
#     libsystemd0 libcap2 libgcrypt20 libgpg-error0 liblz4-1 liblzma5 libzstd1
# (espeak-ng 1.51; libpcaudio0 links ALSA and PulseAudio, never used with --stdout but needed to load). Every
# library but glibc (>= 2.34: libc, libm, ld-linux) comes from these packages, so the host needs only glibc, dpkg-deb
# or python3 (to unpack), torch, numpy and tqdm. The libraries are seen only by espeak-ng: a wrapper in
# $ESPEAK_PREFIX/bin sets LD_LIBRARY_PATH and ESPEAK_DATA_PATH for it alone, and mambakit finds it on PATH
# (`shutil.which("espeak-ng")`), so mambakit needs no change.
#
# Measured on the 2-core dev machine (another job running; OMP_NUM_THREADS=1): the full set, 5,600 clips (train
# 4,480, validation 560, test 560), 180,607,053 bytes (177 MiB: 5,600 WAVs of 32,044 bytes + an 862 KB manifest),
# took 125 s with one job (22 ms a clip, espeak-ng ~20 ms of it) and 64 s on 2 threads (byte-identical, diff -r);
# the whole script 77 s (unpacking the packages 2 s, 27 MB unpacked; reading the set back); peak memory 1.1 GB.
# Not yet run on the GPU machine: with 16 jobs, expect about 15-25 s for the build (extrapolated: 5,600 x 20 ms / 16
# of espeak-ng at once, plus the resampling, which the jobs share under the GIL, and 7 s of writing).
set -euo pipefail
DEBS=${ESPEAK_DEBS:-.espeak}
PREFIX=${ESPEAK_PREFIX:-/tmp/espeak}
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}  # nproc alone obeys OMP_NUM_THREADS
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d /tmp/site ]; then export PYTHONPATH=$PYTHONPATH:/tmp/site; fi

main() {
# 1. unpack the packages (once per machine)
if [ ! -x "$PREFIX/root/usr/bin/espeak-ng" ]; then
  compgen -G "$DEBS/*.deb" > /dev/null || { echo "espeak_device.sh: no .deb files in $DEBS (carry .espeak)"; exit 2; }
  mkdir -p "$PREFIX/root"
  for deb in "$DEBS"/*.deb; do
    if [ -z "${NO_DPKG:-}" ] && command -v dpkg-deb > /dev/null; then
      dpkg-deb -x "$deb" "$PREFIX/root"
    else  # no dpkg: a .deb is an ar archive holding data.tar.*
      "$PYTHON" - "$deb" "$PREFIX/root" <<'PY'
import io, sys, tarfile
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"!<arch>\n", sys.argv[1]
pos = 8
while pos < len(data):
    name, size = data[pos:pos + 16].decode().strip().rstrip("/"), int(data[pos + 48:pos + 58])
    if name.startswith("data.tar"):
        with tarfile.open(fileobj=io.BytesIO(data[pos + 60:pos + 60 + size]), mode="r:*") as tar:
            tar.extractall(sys.argv[2], **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))
        break
    pos += 60 + size + size % 2
else:
    sys.exit(f"{sys.argv[1]}: no data.tar member")
PY
    fi
  done
fi
mkdir -p "$PREFIX/bin"
cat > "$PREFIX/bin/espeak-ng" <<EOF
#!/bin/sh
L=$PREFIX/root/usr/lib/x86_64-linux-gnu
LD_LIBRARY_PATH=\$L:\$L/pulseaudio:$PREFIX/root/lib/x86_64-linux-gnu ESPEAK_DATA_PATH=\$L exec $PREFIX/root/usr/bin/espeak-ng "\$@"
EOF
chmod +x "$PREFIX/bin/espeak-ng"
export PATH=$PREFIX/bin:$PATH
espeak-ng --version || { echo "espeak_device.sh: the unpacked espeak-ng does not run"; exit 2; }

# 2. build the set where the reproduce commands read it, unless a complete one is there
export SPEAKERS=${SPEAKERS:-} TAKES=${TAKES:-2} SEED=${SEED:-0} JOBS FORCE=${FORCE:-}
ROOT=$("$PYTHON" -c "from mambakit.data.spoken_digits import default_root; print(default_root())")
if [ -z "$FORCE" ] && "$PYTHON" - "$ROOT" <<'PY'
import json, os, sys
from mambakit.data.spoken_digits import ACCENTS, VARIANTS
path = os.path.join(sys.argv[1], "manifest.json")
want = int(os.environ["SPEAKERS"] or len(ACCENTS) * len(VARIANTS)) * 10 * int(os.environ["TAKES"])
try:
    m = json.load(open(path))
except OSError:
    sys.exit(1)
sys.exit(0 if m.get("source") == "espeak-ng" and len(m["clips"]) == want else 1)
PY
then
  echo "espeak_device.sh: a complete set is already at $ROOT (FORCE=1 rebuilds it)"
else
  start=$(date +%s)
  "$PYTHON" -m mambakit.cli data spoken-digits --no-progress --jobs "$JOBS" --takes "$TAKES" --seed "$SEED" \
    ${SPEAKERS:+--speakers "$SPEAKERS"}
  echo "espeak_device.sh: built in $(( $(date +%s) - start )) s, $(du -sb "$ROOT" | cut -f1) bytes at $ROOT"
fi

# 3. read it back as the experiments do
"$PYTHON" - <<'PY'
from mambakit.data.spoken_digits import default_root, load_spoken_digits
for split in ("train", "validation", "test"):
    waves, digits = load_spoken_digits(default_root(), split)
    print(f"{split}: {tuple(waves.shape)} clips, digits {sorted(set(digits.tolist()))}")
PY
}

main 2>&1 | tee -a "$OUT/espeak-data.log"
exit "${PIPESTATUS[0]}"
