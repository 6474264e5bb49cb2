#!/usr/bin/env bash
# On-premises recipe, worker node: join the head started by cluster/start-head.sh.
#   cluster/start-worker.sh HEAD_IP:6379        (the address cluster/start-head.sh prints)
# Every node needs the checkout at the head's path, with the head's Python, torch and Ray versions.
# Every node must see the same --storage-path (an NFS mount at the same path, or use an
# s3:// / gs:// URI) and should see the same --data-dir (or have internet to fetch CIFAR-10).
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 HEAD_IP:PORT" >&2
  exit 2
fi
ray start --address="$1"   # CPUs and GPUs of this machine are detected
