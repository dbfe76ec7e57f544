#!/bin/sh
# Download the benchmark peers (Liger, Cut Cross-Entropy) as wheels into wheels/ (git-ignored),
# on a machine with network, before copying the checkout to an offline GPU machine:
# `python -m bench.gpu_check` installs them there with `pip install --no-index --no-deps`.
set -e
cd "$(dirname "$0")/.."
python -m pip download --no-deps liger-kernel cut-cross-entropy -d wheels
