#!/usr/bin/env bash
# The tensor-parallel ranks of one replica as one container (installed as llmrpc-worker-group):
#   llmrpc-worker-group RANKS BASE_PORT SOCKET_DIR [llmrpc worker flags...]
# runs `llmrpc worker` for each rank r, on port BASE_PORT+r and unix socket SOCKET_DIR/worker-r.sock.
# When one rank exits, the others are stopped and the container exits with that rank's status:
# a restarted rank cannot rejoin a process group whose peers live on, so the ranks restart
# together (as `llmrpc serve` restarts them). One container also sees all of the replica's GPUs,
# so NCCL can go peer to peer between them.
set -euo pipefail
ranks=$1 base_port=$2 socket_dir=$3
shift 3
pids=()
stop() {
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait || true
}
trap 'stop; exit 143' TERM INT
for ((rank = 0; rank < ranks; rank++)); do
  llmrpc worker --rank "$rank" --tp "$ranks" --port $((base_port + rank)) \
    --unix-socket "$socket_dir/worker-$rank.sock" "$@" &
  pids+=("$!")
done
status=0
wait -n || status=$?
stop
exit "$status"
