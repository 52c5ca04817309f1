#!/usr/bin/env bash
# genzoo's gan_mnist.py against its base project's, one after the other: DCGAN-32, batch 32, EMA, N steps,
# conditional and unconditional; prints each process's wall time (start-up included).
#
#   git clone https://github.com/gau-nernst/gan /path/gan && git -C /path/gan checkout b72b894   # last gan_mnist.py
#   mkdir -p /path/gan/data/MNIST/raw && gunzip -c /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \
#       > /path/gan/data/MNIST/raw/train-images-idx3-ubyte   # and the labels: torchvision's MNIST reads these files
#   N=300 REPS=2 bash benchmarks/bench_vs_gau_nernst.sh /path/gan
#
# Both sides build the same models (G 1.18 M / D 0.66 M parameters; 1.44 M / 0.73 M conditional) and train on
# Fashion-MNIST; the base project's loader decodes in one worker process, genzoo's reads the in-memory tensors.
set -u
BASE=${1:?usage: bench_vs_gau_nernst.sh /path/to/gau-nernst-gan [at commit b72b894]}
N=${N:-300}; REPS=${REPS:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd); TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
seconds() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$1" "$2"; }
for rep in $(seq "$REPS"); do
  for cond in --conditional ""; do
    s=$(date +%s.%N)
    (cd "$BASE" && python3 gan_mnist.py --model dcgan $cond --ema --batch_size 32 --n_steps "$N" --num_workers 1 \
      --log_img_interval 100000 --checkpoint_interval 100000 --log_interval 100 > "$TMP/base.log" 2>&1) \
      || { echo "base project failed: $(tail -c 300 "$TMP/base.log")"; exit 1; }
    echo "gau-nernst/gan ${cond:-unconditional} rep $rep: $(seconds "$s" "$(date +%s.%N)") s"
    s=$(date +%s.%N)
    (cd "$ROOT" && python3 gan_mnist.py --dataset fashion_mnist --no-download --model dcgan --method gan $cond --ema \
      --batch_size 32 --n_steps "$N" --lr 2e-4 --beta1 0.5 --beta2 0.999 --log_interval 100 --sample_interval 0 \
      --checkpoint_interval 100000 --loggers none --log_dir "$TMP/logs" --log_name "r$rep$cond" > "$TMP/genzoo.log" 2>&1) \
      || { echo "genzoo failed: $(tail -c 300 "$TMP/genzoo.log")"; exit 1; }
    echo "genzoo ${cond:-unconditional} rep $rep: $(seconds "$s" "$(date +%s.%N)") s"
  done
done
