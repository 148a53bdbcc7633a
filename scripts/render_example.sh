#!/usr/bin/env bash
# Render a published example's tables, figures, HTML report and claims again from its result
# files (docs/results/<name>/runs/, written by scripts/publish_example.sh) with the report code of
# this checkout: nothing is trained or evaluated. Each table keeps the result files its published
# CSV lists (its `files` column); costs come from the runs' training summaries and benchmarks.
#
#   scripts/render_example.sh NAME CONFIG [TEACHER.pt ...]
#   e.g. scripts/render_example.sh cifar10_cpu config/cifar10_cpu.yaml t/resnet4b.pt t/resnet2b.pt
#
# CONFIG is the pipeline config the run used (the report shows its header); TEACHER.pt are the
# teachers' model files (`mixacm teacher`; not published) for the report's import checks.
set -euo pipefail

name=${1:?usage: render_example.sh NAME CONFIG [TEACHER.pt ...]}
config=$(realpath "${2:?usage: render_example.sh NAME CONFIG [TEACHER.pt ...]}")
shift 2
teachers=()
for t in "$@"; do teachers+=("$(realpath "$t")"); done
dest=$(cd "$(dirname "$0")/.." && pwd)/docs/results/$name
cd "$dest/runs"   # the tables name result files by their path in the run folder (results/...)

listed() {  # the result files a published table lists
  python -c 'import sys, pandas as pd
for f in pd.read_csv(sys.argv[1], dtype=str)["files"].dropna():
    print("\n".join(f.split(";")))' "$1" | sort -u
}
mapfile -t costs < <(find results -path results/tuning -prune -o \
  \( -name train_summary.json -o -path 'results/benchmarks/train/*.tsv' -o -name benchmark_train.tsv \) -print | sort)
tables=()
for t in "$dest"/table_*.csv; do
  kind=$(basename "$t" .csv); kind=${kind#table_}
  mapfile -t results < <(listed "$t")
  mixacm table --table "$kind" --results "${results[@]}" --costs "${costs[@]}" --out "$t"
  tables+=("$t")
done
mixacm figures --tables "${tables[@]}" --config "$config" --out-dir "$dest/figures"
mapfile -t audits < <(find results -path results/tuning -prune -o -name eval_audit.json -print | sort)
if [ ${#audits[@]} -gt 0 ]; then
  mixacm sweep-figure --audits "${audits[@]}" --config "$config" --out "$dest/figures/eps_sweep.png"
fi
mapfile -t all_results < <(for t in "${tables[@]}"; do listed "$t"; done | sort -u)
mixacm report --tables "${tables[@]}" --figures "$dest"/figures/*.png --results "${all_results[@]}" \
  --costs "${costs[@]}" ${teachers[@]:+--teachers "${teachers[@]}"} --config "$config" --out "$dest/report.html"
mixacm claims --tables "${tables[@]}" --out "$dest/claims.md" > /dev/null
echo "rendered $dest from ${#all_results[@]} result files"
