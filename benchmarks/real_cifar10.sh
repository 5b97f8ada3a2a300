#!/usr/bin/env bash
# Real checkpoints on real data: the two supervised CIFAR-10 ResNets from ../shared/weights
# (akamaster/pytorch_resnet_cifar10 layout) and the raw-pixels floor, evaluated on the
# JPEG copy of CIFAR-10 in ../shared/data with the k-NN and linear-probe cards, through the
# CLI. Records go to results/records, the leaderboard to results/leaderboard.{csv,md}.
#
# Usage (from the repository root):  bash benchmarks/real_cifar10.sh [RESULTS_DIR]
# Needs ../shared (or SHARED=...); prints the wall time of each backbone. CPU only: 25-40
# minutes on a busy 2-core machine for all three rows, nearly all of it feature extraction.
#
# Caveat: the JPEG copy costs accuracy against published CIFAR-10 numbers (ResNet-20: 91.8%
# on the original test set, about 81% with its own classifier on these JPEGs). Compare these
# rows only with rows measured on this copy.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
RESULTS=${1:-results}
DATA=${CIFAR10_DIR:-/tmp/cifar10_jpeg}  # the folder name is the dataset name: keep "jpeg" in it
SSL_EVAL=${SSL_EVAL:-.venv/bin/ssl-eval}

if [ ! -d "$DATA/train" ] || [ ! -d "$DATA/test" ]; then
  mkdir -p "$DATA"
  tar -xzf "$SHARED/data/cifar10_jpeg.tar.gz" -C "$DATA"   # train/<class>/*.jpg, test/<class>/*.jpg
fi

run() {
  local start end
  start=$(date +%s)
  "$SSL_EVAL" run --dataset "folder:$DATA" --protocol knn,linear --results-dir "$RESULTS" \
    --no-progress --no-leaderboard "$@"
  end=$(date +%s)
  echo "wall time ($*): $((end - start)) s"
}

run --backbone cifar_resnet20 --weights "$SHARED/weights/resnet20-12fca82f.th"
run --backbone cifar_resnet56 --weights "$SHARED/weights/resnet56-4bfd9763.th"
run --backbone pixels
"$SSL_EVAL" leaderboard --results-dir "$RESULTS"
