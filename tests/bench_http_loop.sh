#!/bin/bash
# The server's batch loop with 32 streaming HTTP clients against the same 32 rows stepped in-process (no
# HTTP), and 1 against 1, in turn, twice: 2 CPU ranks on gloo, the 110M shape (docs/server.md, "HTTP and the
# batch loop"). Per level it prints the in-process ms per step, bench-serve's line (the server's step and
# loop-round times come from its /metrics), the client's CPU seconds, and each rank's CPU seconds over the
# level (rank 0: model, HTTP thread, scheduler; rank 1: model only).
#   bash tests/bench_http_loop.sh            (CKPT=/tmp/m110 PORT=8431 by default; the checkpoint is made if absent)
set -e
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}; TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
CKPT=${CKPT:-/tmp/m110}; PORT=${PORT:-8431}
test -f "$CKPT/params.json" || $PY -m llama_mp synth "$CKPT" --dim 768 --n_layers 12 --n_heads 12 --multiple_of 32 --mp 2
$TORCHRUN --nproc_per_node 2 --master_port $((PORT + 1)) launch/serve.py --ckpt_dir "$CKPT" \
  --tokenizer_path "$CKPT/tokenizer.model" --port $PORT --max_batch_size 32 --max_seq_len 256 \
  --backend gloo --device cpu 2>"$CKPT.server.log" & server=$!
trap 'pkill -TERM -P $server; wait $server' EXIT
for i in $(seq 240); do curl -sf http://127.0.0.1:$PORT/health >/dev/null && break; sleep 0.5; done
for p in $(pgrep -P $server); do eval "rank$(tr '\0' '\n' < /proc/$p/environ | sed -n 's/^RANK=//p')=$p"; done
cpu() { awk '{print ($14 + $15) / 100}' /proc/$1/stat; }  # user + system seconds (clock ticks of 1/100 s)
for round in 1 2; do
  for rows in 1 32; do
    echo "round $round, $rows row(s): $(uptime)"
    $TORCHRUN --nproc_per_node 2 --master_port $((PORT + 2)) launch/bench.py --ckpt_dir "$CKPT" --batch $rows \
      --prompt_len 12 --new_tokens 32 --runs 3 --backend gloo --device cpu --json 2>/dev/null | tail -1 | \
      $PY -c "import json, sys; r = json.load(sys.stdin); print('in-process, batch', r['batch'], ':', round(r['ms_per_token'], 2), 'ms per step')"
    a0=$(cpu $rank0); a1=$(cpu $rank1)
    /usr/bin/time -f "client cpu %U user + %S sys s, wall %e s" $PY -m llama_mp bench-serve \
      --url http://127.0.0.1:$PORT --concurrency $rows --max_tokens 32 --requests $((rows == 1 ? 16 : 64)) --warmup 1
    awk -v a0="$a0" -v b0="$(cpu $rank0)" -v a1="$a1" -v b1="$(cpu $rank1)" \
      'BEGIN { printf "rank 0 cpu %.2f s, rank 1 cpu %.2f s\n", b0 - a0, b1 - a1 }'
  done
done
echo "end: $(uptime)"
