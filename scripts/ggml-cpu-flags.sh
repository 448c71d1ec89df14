#!/usr/bin/env bash
# Prints the llama.cpp (ggml) build options for this machine's CPU, as KEY=ON words, for the
# llama-cpp-sys-2 build script (it forwards GGML_* environment variables to CMake).
#
# Why: llama.cpp's own default build (GGML_NATIVE) is tuned to the CPU it is built on, and that is
# how llama-server is built; the crate instead builds a baseline x86-64 + AVX2 library unless told
# otherwise. On a CPU with AVX-512 the embedded engine was ~5% behind llama-server at 4 concurrent
# streams without these kernels and level or ahead with them (BENCHMARKS.md, Embedded engine).
# The Makefile exports these, so `make run` / `make test` build for the machine they run on;
# a plain `cargo build` (no make) keeps the portable baseline. Every option is printed, ON or
# OFF, so the build script registers all of them and cargo rebuilds llama.cpp when one changes.
set -euo pipefail
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
out=()
for pair in avx512f:GGML_AVX512 avx512_vnni:GGML_AVX512_VNNI avx512vbmi:GGML_AVX512_VBMI avx512_bf16:GGML_AVX512_BF16; do
    if [[ $flags == *" ${pair%%:*} "* ]]; then out+=("${pair##*:}=ON"); else out+=("${pair##*:}=OFF"); fi
done
echo "${out[*]:-}"
