#!/usr/bin/env bash
# On-premises recipe, head node: start Ray's head and print the address workers join.
# Run from the repository root after `pip install -e .` (or `make install`) on every node.
#   cluster/start-head.sh            (then cluster/start-worker.sh HEAD_IP on each worker)
set -euo pipefail
PORT="${RAY_PORT:-6379}"
# The head runs the driver; give it no CPUs so that trials go to the GPU workers
# (set HEAD_CPUS to let it train too).
ray start --head --port="$PORT" --num-cpus="${HEAD_CPUS:-0}" --num-gpus="${HEAD_GPUS:-0}"
IP="$(hostname -I | awk '{print $1}')"
echo
echo "workers join with:  cluster/start-worker.sh $IP:$PORT"
echo "then run here:      python -m iterand_tune experiments/figure2.py --address auto \\"
echo "                        --storage-path /shared/ray_results --data-dir /shared/data"
