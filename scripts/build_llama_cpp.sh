#!/usr/bin/env bash
# Build llama.cpp's own tools (llama-bench, llama-server, llama-perplexity, llama-batched-bench) from the
# vendor/llama.cpp folder of the llama-cpp-python sdist on PyPI: the peers every benchmark compares against.
#
# The build lives outside the checkout (LLAMA_CPP_HOME, default ~/.cache/mini-claude/llama.cpp) so a fresh
# clone reuses it, and it is native (-DGGML_NATIVE=ON): the binaries are tied to this CPU, as a user's own
# build would be. It never fails the caller: if anything goes wrong the reason is printed and the script
# exits 0, and the benchmarks then skip the llama.cpp rows with that reason.
set -uo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
HOME_DIR="${LLAMA_CPP_HOME:-$HOME/.cache/mini-claude/llama.cpp}"
PY="${PYTHON:-python3}"
# The script changes directory: a relative interpreter path (make passes .venv/bin/python) must become absolute.
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
BIN="$HOME_DIR/build/bin"
TOOLS=(llama-bench llama-server llama-perplexity llama-batched-bench)

have_all() { for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || return 1; done; }
if have_all && [ "$(cat "$HOME_DIR/VERSION" 2>/dev/null)" = "$VERSION" ]; then
  echo "llama.cpp tools from llama-cpp-python $VERSION already built in $BIN"
  exit 0
fi
skip() { echo "llama.cpp peers not built: $*" >&2; echo "benchmarks will skip the llama.cpp rows" >&2; exit 0; }
command -v cmake >/dev/null || skip "cmake is not installed"
mkdir -p "$HOME_DIR" || skip "cannot create $HOME_DIR"
cd "$HOME_DIR" || skip "cannot enter $HOME_DIR"
if [ ! -d src/vendor/llama.cpp ]; then
  rm -rf dl src && mkdir dl
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d dl \
    || skip "could not download the llama-cpp-python $VERSION sdist"
  mkdir src && tar -xzf dl/llama_cpp_python-"$VERSION".tar.gz -C src --strip-components=1 \
    || skip "could not unpack the sdist"
fi
echo "building llama.cpp tools (about 10 minutes on 2 cores) in $HOME_DIR/build"
cmake -S src/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >build.log 2>&1 \
  || skip "cmake configure failed (see $HOME_DIR/build.log)"
cmake --build build -j "$(nproc)" --target "${TOOLS[@]}" >>build.log 2>&1 \
  || skip "the build failed (see $HOME_DIR/build.log)"
have_all || skip "the build finished without all of ${TOOLS[*]}"
echo "$VERSION" >VERSION
echo "llama.cpp tools built in $BIN"
