#!/usr/bin/env bash
# Installs the pinned plugin toolchains into target/plugin-toolchains/ when
# missing or out of date: componentize-qjs, componentize-js and typescript
# from npm (package-lock.json, `npm ci`), componentize-py and pytest from
# PyPI (requirements.txt, into a venv). The JS/TS/Python plugin tests
# (tests/plugin_languages.rs) build with exactly these; `.ci/run` calls this.
#
# A stamp holding the hash of the pin files makes a second run a no-op, and
# a changed pin reinstalls.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
dest="$root/target/plugin-toolchains"
mkdir -p "$dest"

command -v node >/dev/null || { echo "node (>= 18) is needed for the JS/TS plugin toolchains: apt-get install nodejs npm" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 (>= 3.10) with venv is needed for componentize-py: apt-get install python3 python3-venv" >&2; exit 1; }

js_pins="$(cat "$here/package.json" "$here/package-lock.json" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$dest/js.stamp" 2>/dev/null)" != "$js_pins" ]; then
  rm -rf "$dest/js" "$dest/js.stamp"
  mkdir -p "$dest/js"
  cp "$here/package.json" "$here/package-lock.json" "$dest/js/"
  (cd "$dest/js" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$js_pins" > "$dest/js.stamp"
fi

py_pins="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$dest/python.stamp" 2>/dev/null)" != "$py_pins" ]; then
  rm -rf "$dest/python" "$dest/python.stamp"
  python3 -m venv "$dest/python"
  "$dest/python/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
  echo "$py_pins" > "$dest/python.stamp"
fi
