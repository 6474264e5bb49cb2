#!/usr/bin/env bash
# On-premises recipe, head node: start Ray's head and print the address workers join.
# Run from the repository root after `pip install -e .` (or `make install`) on every node.
#   cluster/start-head.sh            (then cluster/start-worker.sh HEAD_IP:6379 on each worker)
# RAY_PORT: the port workers join (default 6379). Ray's other ports: docs/cluster.md, "Ports".
set -euo pipefail
PORT="${RAY_PORT:-6379}"
# The head runs the driver and, by default, no trials: no CPUs or GPUs for Ray, so that trials
# go to the workers. HEAD_CPUS and HEAD_GPUS let it train too (a trial needs both a CPU and
# its GPU share), e.g. HEAD_CPUS=32 HEAD_GPUS=4 cluster/start-head.sh
ray start --head --port="$PORT" --num-cpus="${HEAD_CPUS:-0}" --num-gpus="${HEAD_GPUS:-0}"
IP="$(hostname -I | awk '{print $1}')"
echo
echo "workers join with:  cluster/start-worker.sh $IP:$PORT"
echo "then run here:      python -m iterand_tune experiments/figure2.py --address auto \\"
echo "                        --storage-path /shared/ray_results --data-dir /shared/data"
