#!/usr/bin/env bash
# The steps run on the lent GPU machine (no Rust, no network there). Release binaries are built
# here, stripped, gzipped into .device/bin/ and carried; the default model's GGUF crosses in
# chunks (../shared/device/split.sh + assemble.sh) into /root/stage.
#
#   bash scripts/device.sh tests   # kernel test grid on CUDA + model fidelity (f32, bf16)
#   bash scripts/device.sh train   # Medusa heads (flags below) into /root/heads
#   bash scripts/device.sh bench   # the benchmark report with those heads
#
# Results go to $OUT (what the device tool brings back). LIMIT (seconds, default 560) bounds each
# binary itself, so a step cut short never leaves a process running into the next one.
#
# Lessons from the first H100 session (2026-11-28): the machine is given back 30 s after a call
# ends, and /root (staged model, caches, binaries) goes with it, so issue the three chunk calls
# back to back and chain every step of a session in the last one; a call carries at most 64 MiB
# (chunk 40 MiB + one gzipped binary of ~12 MiB fits, two do not); the first minutes of any CUDA
# run go to autotune and kernel compilation.
#
# Second session (2026-11-28): first use of each shape costs minutes, not seconds (train step 1:
# 224 s, bench kernel section: 350 s for < 10 s of timed work, one e2e prompt: 133 s). Give each
# bench part its own call (e2e first, then `e2e --model random:llama3-8b`, kernel last; `bench`
# without a subcommand now runs them in that order too), and
# fill the distillation cache beforehand (train --distill-shard I/N on any machine; carry
# ~/.cache/burn-decode/distill/*.jsonl and pass --distill-cache).
#
# Third session (2026-11-28, two H200s): CubeCL's PTX/autotune cache on disk (below) cut a repeat
# 8B run from 330 s to 74 s; carry $OUT/cubecl-cache.tgz back as .device/cubecl-cache.tgz (the
# full cache grew to 195 MB, over what a call brings back: take it from an early call). With two
# GPUs, `bg` runs an independent step on the second card while the first works; only files under
# $OUT come back, and a call returns a limited number of them (copy the reports flat into $OUT).
#
# Fourth session (2026-11-28): carry the model chunk with the CubeCL cache first (part02 + cache
# + bench fit one call), so the first step already finds warm caches; training then took 85 s
# (73 s of steps). Binaries run outside this script need its exports (SMOLLM2_GGUF, ...).
#
# Fifth session (2026-11-28, one H200): `bench launch` and `bench tune` need no model (seconds
# each); a pause over 30 s between calls lost the machine and with it /root (model, heads), so
# the chunk calls, training and the e2e runs that need trained heads go back to back.
#
# Tenth session (2026-11-29): a call carries the tracked working tree too, so a 40 MiB chunk
# plus train (12 MiB) plus the distillation cache and prompts went over 64 MiB: carry the
# chunks with one binary each, the data with the last chunk. Two trainings on one H200 at once
# each took 2.1x as long as alone (the GPU, not the host, is the limit at batch 16).
#
# Seventeenth session (2026-12-07): CubeCL 0.10 keys its PTX cache by the kernel's type name and
# launch configuration (`KernelId::stable_hash`), not by its source: a cache carried from a build
# whose `#[cube]` code differs hands the new binary the old kernels. Carry a cache only from a
# build with the same kernel code (`git diff OLD NEW -- kernels/src` touching no `#[cube]` fn),
# else start without one.
set -uo pipefail
step=${1:?step}
shift
export BURN_DECODE_CACHE=/root/cache SMOLLM2_GGUF=/root/stage/SmolLM2-135M-Instruct.Q4_1.gguf
export BURN_DECODE_DEVICE=cuda
OUT=${OUT:-/tmp/out}
mkdir -p /root/bin "$OUT"
# Background steps use what their caller unpacked (two unpacking at once would clash).
[ -n "${SKIP_UNPACK:-}" ] || for f in .device/bin/*.gz; do
  [ -e "$f" ] || continue
  n=$(basename "$f" .gz)
  # Unpack beside and rename: a binary still running from an earlier step is not overwritten.
  gunzip -c "$f" > "/root/bin/.$n.$$" && chmod +x "/root/bin/.$n.$$" && mv -f "/root/bin/.$n.$$" "/root/bin/$n"
done
limit() { timeout -k 5 "${LIMIT:-560}" "$@"; }
# CubeCL keeps compiled PTX and autotune results on disk when cubecl.toml (searched from the
# working directory up) names a cache; the folder travels back as $OUT/cubecl-cache.tgz and, put
# into .device/ and carried, spares the next machine the minutes of first-use compilation.
# The cache is stamped with the `#[cube]` sources it was compiled from (see the seventeenth
# session's note above): a carried cache of other sources is left unpacked, and a warm machine's
# cache of other sources is emptied; one without a stamp (older than the stamp) is used with a
# warning and stays unstamped.
cache=/root/cubecl-cache
mkdir -p $cache
stamp=$( (find kernels/src -type f -name '*.rs'; echo bench/src/launch.rs) | LC_ALL=C sort | xargs -r cat | sha256sum | cut -c1-16)
if [ -e $cache/kernels.stamp ] && [ "$(cat $cache/kernels.stamp)" != "$stamp" ]; then
  echo "the CubeCL cache on this machine was compiled from other kernel sources: emptied" >&2
  find "${cache:?}" -mindepth 1 -delete
fi
if [ -z "$(ls -A $cache)" ]; then
  if [ -e .device/cubecl-cache.tgz ]; then
    carried=$(tar xzf .device/cubecl-cache.tgz -O ./kernels.stamp 2>/dev/null)
    if [ -z "$carried" ]; then
      echo "warning: the carried CubeCL cache has no kernel stamp; using it (unstamped)" >&2
      tar xzf .device/cubecl-cache.tgz -C $cache
    elif [ "$carried" = "$stamp" ]; then
      tar xzf .device/cubecl-cache.tgz -C $cache
    else
      echo "the carried CubeCL cache was compiled from other kernel sources ($carried, now $stamp): not used" >&2
      echo "$stamp" > $cache/kernels.stamp
    fi
  else
    echo "$stamp" > $cache/kernels.stamp
  fi
fi
# PROFILE=minimal|basic|medium|full also logs every kernel launch (with device time from
# "basic" on) to $OUT/cubecl-profile.log: launches per decode step, and kernel time against
# wall time. Keep such runs short (e.g. `bench e2e --model random:llama3-8b --max-new-tokens 4`).
printf '[compilation]\ncache = { file = "%s" }\n\n[autotune]\ncache = { file = "%s" }\n' $cache $cache > cubecl.toml
if [ -n "${PROFILE:-}" ]; then
  printf '\n[profiling.logger]\nlevel = "%s"\nfile = "%s"\nappend = false\n' "$PROFILE" "$OUT/cubecl-profile.log" >> cubecl.toml
fi
# Only foreground steps send it back (background ones write under /root/bg).
save_cache() { [[ $OUT != /root/bg/* ]] && tar czf "$OUT/cubecl-cache.tgz" -C $cache . ; }
case $step in
  setup)
    # Binaries unpacked above; the carried distillation cache goes where --distill-cache points.
    if compgen -G ".device/distill/*.jsonl" > /dev/null; then
      mkdir -p /root/distill && cp .device/distill/*.jsonl /root/distill/
    fi
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
    ls -la /root/bin /root/distill 2>/dev/null
    ;;
  tests)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    for t in attention linear; do
      limit /root/bin/$t-cuda --test-threads=1 > "$OUT/kernel-tests-$t-cuda.log" 2>&1
      echo "$t kernel tests exit $?"; grep -E "test result|FAILED|panicked" "$OUT/kernel-tests-$t-cuda.log" | tail -8
    done
    limit /root/bin/bench fidelity --out "$OUT/fidelity" > "$OUT/fidelity.log" 2>&1
    echo "fidelity exit $?"; tail -14 "$OUT/fidelity.log"
    ;;
  train)
    [ -e .device/data/train_prompts.jsonl.gz ] && mkdir -p /root/data && gunzip -c .device/data/train_prompts.jsonl.gz > /root/data/train_prompts.jsonl
    limit /root/bin/train --data /root/data/train_prompts.jsonl --out /root/heads "$@" > "$OUT/train.log" 2>&1
    echo "train exit $?"; tail -40 "$OUT/train.log"
    cp /root/heads/*.md /root/heads/*.json "$OUT/" 2>/dev/null
    ;;
  bench)
    # BENCH_NAME names the run's folder under $OUT; trained heads are used when present.
    name=${BENCH_NAME:-bench}
    heads=(); [ -d /root/heads ] && heads=(--medusa-heads /root/heads)
    limit /root/bin/bench "${heads[@]}" --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
    echo "bench exit $?"; grep -v "^\s*$" "$OUT/$name/report.md" | tail -60
    ;;
  bg)
    # bg NAME STEP ARGS...: STEP in its own process session (it outlives this call, the machine
    # does not), on the GPU in $GPU (default 1), its results in /root/bg/NAME for `collect`.
    name=${1:?name}; shift
    mkdir -p /root/bg/$name && cp "$0" /root/bg/device.sh
    SKIP_UNPACK=1 CUDA_VISIBLE_DEVICES=${GPU:-1} OUT=/root/bg/$name setsid nohup bash /root/bg/device.sh "$@" \
      > /root/bg/$name.out 2>&1 < /dev/null &
    echo "started $name (pid $!) on GPU ${GPU:-1}"
    ;;
  wait)
    # wait NAME...: until those background steps have written their exit line (or LIMIT).
    end=$((SECONDS + ${LIMIT:-560}))
    for name in "$@"; do
      until grep -q " exit " /root/bg/$name.out 2>/dev/null || [ $SECONDS -ge $end ]; do sleep 5; done
    done
    ;;
  collect)
    for d in /root/bg/*/; do [ -d "$d" ] && cp -r "$d" "$OUT/"; done
    cp /root/bg/*.out "$OUT/" 2>/dev/null
    tail -n 30 /root/bg/*.out 2>/dev/null
    ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
save_cache
