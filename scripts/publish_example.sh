#!/usr/bin/env bash
# Publish a finished workflow run as a documented example under docs/results/<name>/: the tables,
# figures and HTML report the workflow rendered, the claims check (mixacm claims), and under runs/
# the files every number traces to, at the same relative paths as in the run directory (so a
# table's `files` column, e.g. results/cifar10/at/resnet2b/frac1.0/seed0/eval_clean_pgd.json, is
# runs/<that path>).
#
#   scripts/publish_example.sh RUN_DIR NAME
#   e.g. scripts/publish_example.sh /work/cpu_run cifar10_cpu
#
# RUN_DIR is the working directory the workflow ran in. Copied per run: run.yaml,
# train_summary.json, metrics.jsonl, attempts.jsonl, eval_*.json and the job benchmarks; plus the
# teacher's evaluations. Model files are not copied: each result names its model's sha256.
set -euo pipefail

run_dir=${1:?usage: publish_example.sh RUN_DIR NAME}
name=${2:?usage: publish_example.sh RUN_DIR NAME}
repo=$(cd "$(dirname "$0")/.." && pwd)
dest=$repo/docs/results/$name

rm -rf "$dest/runs" "$dest/figures"
mkdir -p "$dest/runs" "$dest/figures"
cd "$run_dir"
find results -type f \( -name run.yaml -o -name train_summary.json -o -name metrics.jsonl -o -name attempts.jsonl \
     -o -name 'eval_*.json' -o -name '*.tsv' \) | sort | while read -r f; do
  mkdir -p "$dest/runs/$(dirname "$f")" && cp "$f" "$dest/runs/$f"
done
tables=()
for t in results/table_*.csv; do
  cp "$t" "$dest/"
  tables+=("$dest/$(basename "$t")")
done
cp results/figures/*.png "$dest/figures/"
cp report/paper_tables.html "$dest/report.html"
mixacm claims --tables "${tables[@]}" --out "$dest/claims.md" > /dev/null
echo "published $dest ($(find "$dest/runs" -type f | wc -l) run files)"
