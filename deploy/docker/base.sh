#!/bin/sh
# Builds the image's Debian base locally, for machines that can pull no image (no registry):
# debootstrap a minimal Debian bookworm (its Python is 3.11, the project's) into a folder and
# `docker import` it. With a registry, skip this and pass BASE_IMAGE=python:3.11-slim-bookworm.
# Usage: deploy/docker/base.sh IMAGE_TAG
set -eu
tag="$1"
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "==> base image $tag exists"
  exit 0
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  echo "deploy/docker/base.sh: debootstrap is missing (Debian: apt-get install debootstrap)" >&2
  exit 1
fi
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
echo "==> no base image can be pulled here: building $tag with debootstrap (bookworm, minbase)"
debootstrap --variant=minbase \
  --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$root" http://deb.debian.org/debian
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' - "$tag"
echo "==> base image $tag: $(docker image inspect --format '{{.Size}}' "$tag") bytes"
