#!/usr/bin/env bash
# Builds and runs the training example: with no arguments, a small RevNet on
# Fashion-MNIST; pass cifar_train flags to change that (see README).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cmake --build "$TORCHREV_BUILD" -j"$jobs" --target cifar_train
train=$TORCHREV_BUILD/examples/cifar/cifar_train
# Debian's OpenBLAS runs its slowest kernels on CPUs it does not know (see
# openblas_coretype.sh); a core type the user names is left alone.
if [[ -z ${OPENBLAS_CORETYPE+set} ]]; then
  coretype=$(bash "$TORCHREV_ROOT/scripts/openblas_coretype.sh" "$train") ||
    coretype=
  if [[ -n $coretype ]]; then
    echo "train.sh: OpenBLAS does not know this CPU and would use its slowest" \
      "kernels; running with OPENBLAS_CORETYPE=$coretype (set" \
      "OPENBLAS_CORETYPE to choose yourself)" >&2
    export OPENBLAS_CORETYPE=$coretype
  fi
fi
exec "$train" "$@"
