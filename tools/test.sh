#!/usr/bin/env bash
# The whole test suite: Python tests (kernels vs references, library, CLI) and the C++ tests (ctest).
# Assumes the package is installed (see README). Any failure, or pytest finding no tests, fails.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q "$@"
prefix="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$prefix" > build/cmake.log 2>&1 || { cat build/cmake.log; exit 1; }
cmake --build build/cmake -j2 >> build/cmake.log 2>&1 || { cat build/cmake.log; exit 1; }
ctest --test-dir build/cmake --output-on-failure
