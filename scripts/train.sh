#!/usr/bin/env bash
# Builds and runs the training example: with no arguments, a small RevNet on
# Fashion-MNIST; pass cifar_train flags to change that (see README).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cmake --build "$TORCHREV_BUILD" -j"$jobs" --target cifar_train
exec "$TORCHREV_BUILD/examples/cifar/cifar_train" "$@"
