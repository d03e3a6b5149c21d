#!/usr/bin/env bash
# Here, before a lent GPU's one call (run.sh): the packages whisper_ft needs that the GPU
# machine's Python 3.12 lacks, as wheels in .gpu/wheels/ (ignored; about 5.5 MB).
# pyopenjtalk is left out (with its dictionaries, over 200 MB): the GPU checks train on
# transcripts as written (--target text).
set -euo pipefail
cd "$(dirname "$0")"
rm -rf wheels && mkdir wheels
pip=(python3 -m pip -q --disable-pip-version-check)
tags=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64)
tags+=(--platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64)
tags+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"${pip[@]}" download --no-deps --only-binary=:all: "${tags[@]}" -d wheels \
    more-itertools==11.2.1 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 jiwer==4.0.0 \
    rapidfuzz==3.14.6  # (the versions the tests pass with here)
"${pip[@]}" wheel --no-deps -w wheels openai-whisper==20250625  # (an sdist only)
ls wheels
