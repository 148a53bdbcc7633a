"""Every shell command the documentation shows runs as written.

Sources: fenced ``bash`` / ``sh`` / ``shell`` / ``console`` blocks of README.md and docs/**/*.md
(each block runs as one bash script, in order, in a fresh copy of the checkout), and the command
lines in the comment headers of the Snakefile, the rule files, the configs and the profiles
(``#   snakemake ...``, ``#   mixacm ...``). An untagged block that starts a line with a command is
an error: tag it ``bash`` (it is run) or ``text`` (a usage synopsis, not run).

What cannot run here as written is changed in one visible place, SUBSTITUTIONS, each with its
reason; a substitution that no longer matches anything is an error, so the list stays honest.
``snakemake`` runs as a dry run (``-n`` put first, so the documented argument order is what gets
parsed), ``pytest`` only collects (running the suite from inside itself would recurse).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARED = Path(os.environ.get("MIXACM_SHARED", REPO.parent / "shared"))

SHELL_LANGS = {"bash", "sh", "shell", "console"}
# First words that make a line a command (for the check on untagged blocks and comment headers).
PROGRAMS = {"snakemake", "mixacm", "pytest", "python", "python3", "python3.11", "pip", "export",
            "sudo", "torchrun", "srun", "sbatch", "sinfo", "scripts/slurm/start.sh",
            "scripts/slurm/stop.sh", "scripts/publish_example.sh", "scripts/render_example.sh",
            ".venv/bin/pytest", "OMP_NUM_THREADS=1"}
HEADER_FILES = ["workflow/Snakefile", "workflow/rules/*.smk", "config/**/*.yaml",
                "workflow/profiles/*/config.yaml"]
HEADER_LINE = re.compile(r"^#\s{2,}((?:snakemake|mixacm)\s.*?)(?:\s{2,}[#(].*)?$")

# (file, text as written, what runs instead, why). Every entry must match its file.
SUBSTITUTIONS = [
    ("README.md", "python3.11 -m venv .venv && .venv/bin/pip install -e .",
     ": venv install skipped",
     "builds a venv and installs several GB of packages: .ci/run runs exactly this command on "
     "every CI run"),
    ("README.md", ".venv/bin/pip install torch==2.14.1 torchvision==0.29.1 --index-url "
                  "https://download.pytorch.org/whl/cpu", ": CPU-only torch install skipped",
     "download.pytorch.org is not reachable from the test machines (PyPI only)"),
    ("README.md", "python3.11 -m venv .venv\n", ": venv skipped\n",
     "the venv of the CPU-only install; the lines after it install into it"),
    ("README.md", ".venv/bin/pip install -e .", ": install skipped",
     "installs several GB of packages: .ci/run runs exactly this command on every CI run"),
    ("README.md", "--data-root DIR", '--data-root "$MIXACM_DATA_CIFAR10"',
     "the placeholder for the reader's copy of CIFAR-10: the shared JPEG copy here"),
    ("README.md", "--n 1000", "--n 20",
     "APGD on 1,000 points takes about 15 min on 2 cores; 20 points exercise the same code"),
    ("docs/benchmarks.md", "bench_methods.py --threads 1",
     "bench_methods.py --threads 1 --warmup 1 --rounds 1 --iters 1 --batch-size 16",
     "the full timing takes minutes; one step of each method on a small batch runs the same code"),
    ("docs/benchmarks.md", "bench_data.py --dataset cifar10 --json",
     "bench_data.py --dataset cifar10 --json --images 512 --rounds 1",
     "50,000 images x 5 rounds of the per-sample baseline take minutes; 512 images run the same code"),
    ("docs/benchmarks.md", "bench_data.py --dataset imagenet --json",
     "bench_data.py --dataset imagenet --json --images 8 --batch-size 4 --rounds 1 --workers 1",
     "writing and decoding 512 JPEGs with 0, 1 and 2 workers takes minutes; 8 run the same code"),
    ("docs/benchmarks.md", "python benchmarks/bench_methods.py --model wrn-34-10 --device cuda",
     ': "needs CUDA, not run" #',
     "needs a GPU (the GPU checks run it where there is one)"),
    ("docs/benchmarks.md", "python benchmarks/profile_step.py --out",
     "python benchmarks/profile_step.py --device cpu --dry-run --out",
     "needs CUDA for its figures; the dry run times and profiles the same variants with tiny models on the CPU"),
    ("docs/benchmarks.md", "python benchmarks/gpu_check.py --phases goals --steps 40",
     "python benchmarks/gpu_check.py --device cpu --dry-run --phases goals",
     "needs CUDA (gpu_check exits with status 2 without it); the dry run builds and times the same goals phase"),
    ("docs/benchmarks.md", "python benchmarks/bench_threads.py",
     "python benchmarks/bench_threads.py --seconds 0.2 --warmup 1 --workloads eval-pgd20 --batch 10",
     "the full measurement takes about 2 minutes; one job kind for a fraction of a second on a "
     "small batch runs the same code"),
    ("docs/report.md", "scripts/render_example.sh cifar10_cpu config/cifar10_cpu.yaml",
     ": re-rendering skipped",
     "renders every table, figure and the report of the published run again (about 80 s on 2 "
     "cores); tests/test_report.py builds the same tables and report from the same result files"),
    ("docs/results/cifar10_cpu/README.md",
     "python scripts/tune_holdout.py config/tuning/cifar10_cpu.yaml --out-dir results/tuning --csv results/tuning.csv",
     ": holdout search skipped",
     "trains 25 candidates (53 min on 2 cores); tests/test_train.py checks the last-epoch holdout "
     "scoring it reads"),
    ("docs/results/cifar10_cpu/README.md", "scripts/publish_example.sh <that checkout> cifar10_cpu",
     ": publishing skipped",
     "copies a finished 2 h 23 min run of config/cifar10_cpu.yaml; the snakemake line above it is "
     "dry-run"),
    ("docs/slurm.md", "sudo .venv/bin/pytest", "pytest",
     "collecting needs no root; the tests run in the current environment, not a .venv"),
    ("docs/slurm.md", ".venv/bin/pytest", "pytest",
     "the tests run in the current environment, not a .venv of the checkout"),
]
# Blocks that are not run at all, by (file, the start of one of the block's lines).
SKIPPED_BLOCKS = {
    ("docs/slurm.md", "sudo scripts/slurm/start.sh"):
        "starts SLURM daemons as root: tests/test_slurm.py (-m slurm) runs these steps for real",
}

PRELUDE = """\
set -euo pipefail
snakemake() { command snakemake -n "$@"; }
pytest() {  # exit status 5: no test carries the selected marker (e.g. -m gpu), not a broken command
    local rc=0; command pytest --collect-only -q -p no:cacheprovider "$@" || rc=$?
    if [ "$rc" -eq 5 ]; then return 0; fi; return "$rc"; }
"""


@dataclass(frozen=True)
class Source:
    file: str      # relative to the repository root
    line: int      # 1-based line of the block's first line
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def fenced_blocks(path: Path) -> list[Source]:
    text = path.read_text()
    rel = path.relative_to(REPO).as_posix()
    blocks = []
    for m in re.finditer(r"^( *)```(\w*)[^\n]*\n(.*?)^\1```", text, re.M | re.S):
        body = "\n".join(line[len(m.group(1)):] for line in m.group(3).splitlines())
        blocks.append(Source(rel, text[: m.start()].count("\n") + 2, m.group(2), body))
    return blocks


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def header_commands() -> list[Source]:
    out = []
    for pattern in HEADER_FILES:
        for path in sorted(REPO.glob(pattern)):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                m = HEADER_LINE.match(line)
                if m and "..." not in m.group(1) and "[" not in m.group(1):
                    out.append(Source(path.relative_to(REPO).as_posix(), i, "header", m.group(1)))
    return out


def first_word(line: str) -> str:
    words = line.split()
    return words[0] if words else ""


def shell_sources() -> list[Source]:
    blocks = [b for p in doc_files() for b in fenced_blocks(p) if b.lang in SHELL_LANGS]
    return blocks + header_commands()


def apply_substitutions(src: Source) -> str:
    text = src.text
    for file, old, new, _why in SUBSTITUTIONS:
        if file == src.file:
            text = text.replace(old, new)
    return text


def _has_line(text: str, start: str) -> bool:
    return any(l.strip().startswith(start) for l in text.splitlines())


def skipped(src: Source) -> str | None:
    for (file, line), why in SKIPPED_BLOCKS.items():
        if file == src.file and _has_line(src.text, line):
            return why
    return None


# -- the extraction and its rules (fast) ----------------------------------------------------------


def test_untagged_blocks_hold_no_commands():
    bad = []
    for path in doc_files():
        for block in fenced_blocks(path):
            if block.lang == "":
                lines = [l for l in block.text.splitlines() if first_word(l) in PROGRAMS]
                if lines:
                    bad.append(f"{block.id}: {lines[0]!r}")
    assert not bad, ("untagged code blocks with commands: tag them ```bash (the test runs them) or "
                     "```text (usage synopsis):\n" + "\n".join(bad))


def test_every_substitution_and_skip_still_matches():
    texts = {}
    for src in shell_sources():
        texts.setdefault(src.file, []).append(src.text)
    for file, old, _new, why in SUBSTITUTIONS:
        assert why
        assert any(old in t for t in texts.get(file, [])), f"{file}: substitution {old!r} matches nothing"
    for (file, line), why in SKIPPED_BLOCKS.items():
        assert why
        assert any(_has_line(t, line) for t in texts.get(file, [])), f"{file}: skip {line!r} matches nothing"


def test_extraction_finds_the_documented_commands():
    ids = {s.file for s in shell_sources()}
    assert {"README.md", "docs/pipeline.md", "docs/slurm.md", "workflow/Snakefile",
            "config/config.yaml"} <= ids
    text = "\n".join(s.text for s in shell_sources())
    # the command of the issue: a target after --configfile is read as a second config file
    assert "snakemake results/table_cifar10.csv --cores all --configfile config/config.yaml" in text
    assert not re.search(r"--configfile \S+ +[\w/]+\.(csv|html)", text), \
        "a target placed after --configfile is read as a config file"


# -- running them (slow) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run_files(tmp_path_factory):
    """Files the README's `mixacm` block assumes the reader has: run.yaml and a foreign model M.pt2."""
    import torch

    from mixacm.models import build_model

    d = tmp_path_factory.mktemp("assumed")
    (d / "run.yaml").write_text(
        "name: docs/mixacm\nseed: 0\ndataset: {name: cifar10}\nmodel: {name: resnet2b}\n"
        "teacher: teacher.pt\nmethod: {name: mixacm}\noptim: {epochs: 1, batch_size: 16}\n"
        "train: {max_steps_per_epoch: 2, progress: false}\n")
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.rand(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(d / "M.pt2"))
    return d


def checkout_copy(dest: Path) -> Path:
    """A checkout for one source: workflow/ and config/ copied (Snakemake writes beside them), the
    rest linked, ../shared beside it like in a real checkout."""
    repo = dest / "repo"
    repo.mkdir(parents=True)
    for name in ("workflow", "config"):
        shutil.copytree(REPO / name, repo / name)
    for name in ("environment.yml", "pyproject.toml", "README.md", "mixacm", "tests", "scripts",
                 "benchmarks", "docs"):
        if (REPO / name).exists():
            (repo / name).symlink_to(REPO / name)
    if SHARED.is_dir():
        (dest / "shared").symlink_to(SHARED)
    return repo


@pytest.mark.slow
@pytest.mark.parametrize("src", shell_sources(), ids=lambda s: s.id)
def test_documented_command_runs(src, tmp_path, tiny_run_files):
    why = skipped(src)
    if why:
        pytest.skip(why)
    if not (SHARED / "data" / "cifar10-jpeg" / "test").is_dir():
        pytest.skip(f"CIFAR-10 JPEG copy not found under {SHARED} (set MIXACM_SHARED)")
    repo = checkout_copy(tmp_path)
    for f in tiny_run_files.iterdir():
        shutil.copy(f, repo / f.name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXACM_DATA_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
               MIXACM_DATA_CIFAR10=str(SHARED / "data" / "cifar10-jpeg"))
    script = PRELUDE + apply_substitutions(src)
    proc = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{src.id} failed:\n{script}\n--- output:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
