#!/usr/bin/env bash
# Builds the Debian package (target/debian/extauth-broker_<version>-1_<arch>.deb):
#   1. release binaries of the shim and the broker;
#   2. the man pages and shell completions, generated from the binaries;
#   3. `cargo deb --no-build` with [package.metadata.deb] from Cargo.toml.
# Needs cargo-deb (`cargo install cargo-deb --locked`). Extra arguments go to cargo deb
# (e.g. --deb-revision 2, --fast). Prints the path of the package last.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "build-deb.sh: cargo-deb is missing; install it with: cargo install cargo-deb --locked" >&2
    exit 1
fi

target=${CARGO_TARGET_DIR:-target}

# The shim depends on extauth-protocol alone, so building both together links it against
# neither tokio, redis nor reqwest.
cargo build --release -p extauth-shim --bin extauth-shim -p extauth-broker --bin extauth-broker

assets="$target/release/deb-assets"
rm -rf "$assets"
mkdir -p "$assets/completions"
broker="$target/release/extauth-broker"
"$broker" man | gzip -9n >"$assets/extauth-broker.1.gz"
gzip -9n <deploy/debian/extauth-shim.1 >"$assets/extauth-shim.1.gz"
"$broker" completions bash >"$assets/completions/extauth-broker"
"$broker" completions zsh >"$assets/completions/_extauth-broker"
"$broker" completions fish >"$assets/completions/extauth-broker.fish"

out=$(cargo deb --no-build -p extauth-broker "$@")
echo "$out"
