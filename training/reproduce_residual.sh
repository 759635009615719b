#!/usr/bin/env bash
# Residual-RL seeds of several architectures on one GPU machine (MuJoCo rendering through EGL): demonstrations with
# images if missing -> the jobs, several training processes side by side ("lanes", spread over the machine's GPUs)
# -> training/report.py over everything finished.
#
#   JOBS="B1:0 V4:0 V4:1 V5:0 V5:1 V6:0" LANES=2 ENVS=7 bash training/reproduce_residual.sh runs/residual
#   DEADLINE_S=540 bash training/reproduce_residual.sh runs/residual    # machines that limit one command's time
#   JOBS="V4:0 V4:1 V5:0 V5:1 V4:0:gate=0 V4:1:gate=0 V5:0:gate=0 V5:1:gate=0" LANES=4 ENVS=7 \
#       bash training/reproduce_residual.sh runs/residual             # each seed then its critic-gated evaluation
#   JOBS="V4:0 V4:0:best=4 V4:0:best=4,gate=0" bash training/reproduce_residual.sh runs/residual   # critics choose
#
# A job is ARCH:SEED (B1 B2 V3 V4 V5 V6), ARCH:SEED:probes for the communication probes of a trained V5/V6 seed,
# ARCH:SEED:ablation for Table 2's recipe ladder on a trained seed (--mode ablation), or ARCH:SEED:gate=M for the
# evaluation of a trained seed with the critic gate at margin M (--mode eval --gate-margin M; the report shows it as
# the method "ARCH gate M", paired with the ungated one), ARCH:SEED:best=K for one with the critics choosing among K
# π0 draws per agent and chunk (--mode eval --candidates K: "ARCH best-of-K"), or ARCH:SEED:best=K,gate=M for both.
# A probes, ablation, gate or best job runs in the lane of its
# seed's training job, after it, wherever it stands in JOBS; without that job in JOBS it needs the seed trained by an
# earlier call. Each of them continues an evaluation cut off by DEADLINE_S where it stopped. Lanes take the training jobs in turn (job k of them goes to lane k mod LANES), each with
# the jobs that need it. EXTRA="--eval-every 0" evaluates only the final networks
# (residual.py's default also evaluates every 1,000 chunks, 100 episodes each time). With
# DEADLINE_S, every job gets --stop-after-s for the time this call has left (an evaluation stops there too, keeping
# its finished episodes), and the same command resumes each job where it stopped: rerun it until it prints "all
# jobs done".
# Simulation is CPU-bound: LANES x ENVS should not exceed the machine's cores.
set -uo pipefail
OUT=${1:-runs/residual}
PY=${PYTHON:-python3}
CORES=$($PY -c "import os; print(len(os.sched_getaffinity(0)))")
JOBS=${JOBS:-"B1:0 V4:0 V5:0 V6:0"}
LANES=${LANES:-2}
ENVS=${ENVS:-$(( CORES / LANES > 1 ? CORES / LANES - 1 : 1 ))}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-data/transport_scripted.hdf5}
EPISODES=${EPISODES:-100}           # demonstrations (the demo buffer uses the train split: 90 of 100)
DEADLINE_S=${DEADLINE_S:-}
PROBE_EPISODES=${PROBE_EPISODES:-100}
EXTRA=${EXTRA:-}                    # more training/residual.py flags, the same for every job (one setting per report)
START=$(date +%s)
export MUJOCO_GL=${MUJOCO_GL:-egl}
mkdir -p "$OUT/logs"

if [[ ! -f "$DATA" ]]; then
    echo "== demonstrations: $EPISODES scripted episodes, 3 cameras at 96 px, $CORES workers -> $DATA"
    $PY training/demos.py --episodes "$EPISODES" --out "$DATA" --images --image-size 96 --workers "$CORES" \
        --no-progress > "$OUT/logs/demos.log" 2>&1 || { tail -20 "$OUT/logs/demos.log"; exit 1; }
fi

left() { [[ -z "$DEADLINE_S" ]] && echo 999999 || echo $(( DEADLINE_S - ($(date +%s) - START) )); }

# The directory of an evaluation in which the critics choose, as training/residual.py names it (residual.train.
# selection_name; margins in Python's format "g": 0.0 -> 0, 1e-3 -> 0.001): gate=M -> gate_M, best=K -> best_of_K,
# best=K,gate=M -> best_of_K_gate_M.
selection() { $PY -c "import sys
s = dict(p.split('=', 1) for p in sys.argv[1].split(','))
k, m = int(s.get('best', 1)), s.get('gate')
print('_'.join(([f'best_of_{k}'] if k > 1 else []) + ([f'gate_{float(m):g}'] if m is not None else [])))" "$1"; }

# training/residual.py's flags of a job's critic selection: gate=M -> --gate-margin M, best=K -> --candidates K
# (comma-separated, K > 1); nothing and status 1 for anything else.
selection_flags() {
    local part flags=()
    IFS=, read -r -a parts <<<"$1"
    for part in "${parts[@]}"; do
        case $part in
            gate=?*) flags+=(--gate-margin "${part#gate=}") ;;
            best=?*) [[ ${part#best=} =~ ^[0-9]+$ ]] && (( ${part#best=} > 1 )) || return 1  # best=1: the plain run
                     flags+=(--candidates "${part#best=}") ;;
            *) return 1 ;;
        esac
    done
    echo "${flags[@]}"
}

# The file a finished job leaves: result.json of a seed, probes.json of its probes, ablation.json of its recipe
# ladder, <selection>/result.json of an evaluation in which the critics choose.
marker() {
    case $3 in
        probes) echo "$OUT/$1/seed_$2/probes.json" ;;
        ablation) echo "$OUT/$1/seed_$2/ablation.json" ;;
        gate=*|best=*) echo "$OUT/$1/seed_$2/$(selection "$3")/result.json" ;;
        *) echo "$OUT/$1/seed_$2/result.json" ;;
    esac
}

# One job until done (or out of time): 0 done, 1 out of time, 2 failed.
run_job() {
    local arch=$1 seed=$2 mode=$3 marker log s budget flags
    log="$OUT/logs/$arch.s$seed.${mode//[=,]/}.log"
    local args=(--arch "$arch" --seed "$seed" --out "$OUT/$arch" --envs "$ENVS" --device "$DEVICE" --data "$DATA"
                --no-progress)
    case $mode in
        train) args+=(--mode train) ;;
        probes) args+=(--mode probes --eval-episodes "$PROBE_EPISODES") ;;
        ablation) args+=(--mode ablation) ;;
        gate=*|best=*) if flags=$(selection_flags "$mode"); then read -r -a flags <<<"$flags"
                       args+=(--mode eval "${flags[@]}"); else mode=unknown; fi ;;
        *) mode=unknown ;;
    esac
    if [[ $mode == unknown ]]; then
        echo "$arch:$seed:$3: unknown job (ARCH:SEED, ARCH:SEED:probes, ARCH:SEED:ablation, ARCH:SEED:gate=M," \
             "ARCH:SEED:best=K, ARCH:SEED:best=K,gate=M)"
        return 2
    fi
    marker=$(marker "$arch" "$seed" "$mode")
    [[ $mode != train && ! -f $(marker "$arch" "$seed" train) ]] && {
        echo "$arch seed $seed $mode: seed $seed of $arch is not trained (add $arch:$seed to JOBS)"; return 2; }
    while [[ ! -f "$marker" ]]; do
        s=$(left)
        (( s < 90 )) && return 1
        budget=()
        # the command saves and stops 30 s before the call's deadline; timeout is the backstop
        [[ -n "$DEADLINE_S" ]] && budget=(--stop-after-s $(( s - 30 )))
        echo "[$(date +%T)] $arch seed $seed $mode (${DEADLINE_S:+$s s left})"
        if [[ -n "$DEADLINE_S" ]]; then
            timeout "$s" $PY training/residual.py "${args[@]}" "${budget[@]}" $EXTRA >> "$log" 2>&1
        else
            $PY training/residual.py "${args[@]}" $EXTRA >> "$log" 2>&1
        fi
        case $? in
            0) ;;
            124) return 1 ;;
            *) echo "$arch seed $seed $mode failed (log: $log):"; tail -5 "$log"; return 2 ;;
        esac
    done
    echo "[$(date +%T)] $arch seed $seed $mode done: $($PY -c "import json,sys; r=json.load(open(sys.argv[1]))
print(f\"success {r['success_rate']:.2f}\" if 'success_rate' in r else 'written: ' + sys.argv[1])" "$marker")"
    return 0
}

lane() {
    local job arch seed mode
    for job in "$@"; do
        IFS=: read -r arch seed mode <<<"$job"
        run_job "$arch" "$seed" "${mode:-train}" || return
    done
}

read -r -a jobs <<<"$JOBS"
# Groups: each training job, then the jobs that need it (its probes, ladder and critic-selected evaluations) in the order of JOBS; a
# job whose training job is not in JOBS is a group of its own.
groups=()
declare -A group_of=()
for job in "${jobs[@]}"; do
    IFS=: read -r arch seed mode <<<"$job"
    [[ -z $mode ]] || continue
    group_of["$arch:$seed"]=${#groups[@]}
    groups+=("$job")
done
for job in "${jobs[@]}"; do
    IFS=: read -r arch seed mode <<<"$job"
    [[ -n $mode ]] || continue
    g=${group_of["$arch:$seed"]:-}
    if [[ -n $g ]]; then groups[g]+=" $job"; else groups+=("$job"); fi
done
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
pids=()
for (( l = 0; l < LANES; l++ )); do
    mine=()
    for (( g = l; g < ${#groups[@]}; g += LANES )); do read -r -a members <<<"${groups[g]}"; mine+=("${members[@]}"); done
    (( ${#mine[@]} )) || continue
    if (( ngpu > 0 )); then export CUDA_VISIBLE_DEVICES=$(( l % ngpu )); fi
    lane "${mine[@]}" > "$OUT/logs/lane$l.out" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
cat "$OUT"/logs/lane*.out

missing=0
for job in "${jobs[@]}"; do
    IFS=: read -r arch seed mode <<<"$job"
    [[ -f $(marker "$arch" "$seed" "${mode:-train}") ]] || missing=$(( missing + 1 ))
done
if (( missing )); then
    echo "$missing of ${#jobs[@]} jobs not done: rerun the same command to continue"
else
    echo "all jobs done"
fi
if [[ -z $(find "$OUT" -name result.json -print -quit) ]]; then
    echo "no seed finished yet: no report"
else
    $PY training/report.py "$OUT" --out "$OUT/report" > "$OUT/logs/report.log" 2>&1 \
        && echo "report: $OUT/report/report.md" || tail -3 "$OUT/logs/report.log"
fi
echo "call $(( $(date +%s) - START )) s"
