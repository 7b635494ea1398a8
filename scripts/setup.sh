#!/usr/bin/env bash
# Installs what a fresh machine lacks to build multidb: libclang, which the bindgen build of
# sqlite-loadable needs. Safe to run again; does nothing when everything is there.
set -euo pipefail

have_libclang() {
  [ -n "${LIBCLANG_PATH:-}" ] && return 0
  ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so' && return 0
  ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1
}

if ! have_libclang; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing libclang-dev (needed by bindgen)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null
  else
    echo "setup: libclang missing and apt-get unavailable; install libclang-dev, or" >&2
    echo "       pip install libclang && export LIBCLANG_PATH=\$(python3 -c 'import clang,os;print(os.path.dirname(clang.__file__)+\"/native\")')" >&2
    exit 1
  fi
fi
