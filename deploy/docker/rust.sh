#!/bin/sh
# The Rust toolchain the builder stage compiles native/ with, as an image laid out like the
# official rust images (RUSTUP_HOME=/usr/local/rustup, CARGO_HOME=/usr/local/cargo), made
# from this machine's rustup toolchain for machines that can pull no image. Debian's rustc is
# too old for the crate's dependencies. With a registry: RUST_IMAGE=rust:1.95-slim-bookworm.
# Usage: deploy/docker/rust.sh IMAGE_TAG
set -eu
tag="$1"
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "==> Rust image $tag exists"
  exit 0
fi
rustup_home="${RUSTUP_HOME:-$HOME/.rustup}"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
toolchain="$(rustup show active-toolchain | cut -d' ' -f1)"
if [ ! -d "$rustup_home/toolchains/$toolchain" ]; then
  echo "deploy/docker/rust.sh: no rustup toolchain found (install Rust with rustup, or pass RUST_IMAGE)" >&2
  exit 1
fi
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
echo "==> no Rust image can be pulled here: building $tag from $toolchain"
mkdir -p "$root/usr/local/rustup/toolchains" "$root/usr/local/cargo/bin"
cp -a "$rustup_home/toolchains/$toolchain" "$root/usr/local/rustup/toolchains/"
rm -rf "$root/usr/local/rustup/toolchains/$toolchain/share/doc"
printf 'version = "12"\ndefault_toolchain = "%s"\n' "$toolchain" > "$root/usr/local/rustup/settings.toml"
for tool in rustup cargo rustc rustdoc; do cp "$cargo_home/bin/$tool" "$root/usr/local/cargo/bin/"; done
tar -C "$root" -c . | docker import - "$tag"
