#!/usr/bin/env bash
# Fetch, on this machine, the wheels the lent GPU machine's image lacks, into .whl/ (ignored
# by git; the device tool carries it with `carry: [".whl"]`, and gpu_check.sh installs it).
# The image's Python is 3.12 on x86-64 (the device tool's KINDS.md): the wheels are for that,
# whatever this machine runs. zstandard is a dependency of the package; randomgen is the
# reference the Philox tests compare with; setuptools new enough for pyproject.toml (the
# build-system table) lets gpu_check.sh install the package in place without an index.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "zstandard==${ZSTANDARD_VERSION:-0.25.0}" "randomgen==${RANDOMGEN_VERSION:-2.5.1}" \
  "setuptools==${SETUPTOOLS_VERSION:-84.2.1}"
ls -la .whl
