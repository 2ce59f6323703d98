#!/usr/bin/env bash
# s3rver (npm package, a second S3 server written independently of moto) for the S3 blob-store tests
# and bench/client_bench.py: installed with npm under ${XDG_CACHE_HOME:-~/.cache}/deltastore/s3rver,
# where tests/support/live_registry.py looks for it. Never fails CI: without node/npm (or without the
# registry) the s3rver cases skip, saying why, and moto still runs every S3 test.
set -u
VERSION=3.7.1
PREFIX="${XDG_CACHE_HOME:-$HOME/.cache}/deltastore/s3rver"
if [ -x "$PREFIX/node_modules/.bin/s3rver" ] &&
   [ "$("$PREFIX/node_modules/.bin/s3rver" --version 2>/dev/null)" = "$VERSION" ]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "s3rver.sh: no npm here; the s3rver test cases will be skipped" >&2
  exit 0
fi
mkdir -p "$PREFIX"
if npm install --silent --no-audit --no-fund --prefix "$PREFIX" "s3rver@$VERSION" >/dev/null 2>&1; then
  echo "s3rver.sh: installed s3rver $("$PREFIX/node_modules/.bin/s3rver" --version)" >&2
else
  echo "s3rver.sh: could not install s3rver $VERSION; the s3rver test cases will be skipped" >&2
fi
exit 0
