"""GPU-hours and disk of a pipeline config, estimated before any job runs.

One job on the GPU costs

    GPU-seconds = forward-equivalents x FLOPs of one forward pass / (peak FLOP/s x utilisation)

* a training run: the method's work per image (``methods`` in ``mixacm/cost.yaml``: student
  passes, teacher forwards scaled by the teacher's FLOPs, attack iterations, Free-AT's replays)
  x the images its resolved recipe trains on (epochs x steps per epoch x batch size, or its
  ``steps``), plus the best-PGD selection after every epoch; priced at the precision its
  ``train.amp`` sets (bf16, fp16, or none: TF32 convolutions);
* an evaluation: the attacks' work per test point x the test points (clean and PGD-K on all of
  them; AutoAttack's later attacks and the audit's stronger ones on the share a robust model keeps
  correct), in TF32;
* the FLOPs of a forward pass are counted with ``torch.utils.flop_counter`` on a network built on
  the meta device (no memory, no weights).

A multi-GPU job (ImageNet training under torchrun) costs the same GPU-hours spread over its GPUs
(wall time = GPU-hours / GPUs, linear scaling assumed). The jobs are those of the workflow's
default target (``all``): every run of every experiment once, its evaluations, the DAG-trained
teacher; imports and renderers need no GPU. Disk: the networks each run and teacher keeps, and the
CIFAR download and cache. Every assumption lives in ``mixacm/cost.yaml``; this is a price before
submitting, until a GPU measures the throughputs (docs/benchmarks.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import yaml

ASSUMPTIONS_PATH = Path(__file__).resolve().parent / "cost.yaml"
# An evaluation kind -> the resources.<dataset> entry its job is scheduled with (the workflow's).
JOB_RESOURCES = {"train": "train", "clean_pgd": "evaluate", "autoattack": "autoattack",
                 "autoattack_standard": "autoattack", "audit": "autoattack"}


@dataclass(frozen=True)
class JobCost:
    """One GPU job of a pipeline config: ``kind`` (train, clean_pgd, autoattack,
    autoattack_standard, audit), the run it belongs to (``<dataset>/<recipe>/<arch>/frac<f>/seed<s>``
    or ``teachers/<dataset>``), its precision, GPUs, estimated GPU-hours and disk in GB."""

    kind: str
    run: str
    dataset: str
    precision: str
    gpus: int
    gpu_hours: float
    disk_gb: float = 0.0

    @property
    def wall_hours(self) -> float:
        return self.gpu_hours / max(1, self.gpus)


@lru_cache(maxsize=1)
def assumptions() -> dict[str, Any]:
    return yaml.safe_load(ASSUMPTIONS_PATH.read_text())


@lru_cache(maxsize=32)
def network_size(arch: str, dataset: str) -> tuple[float, int, str]:
    """(FLOPs of one forward pass of one image, parameters, family) of ``arch`` at ``dataset``'s
    image size and classes, counted on the meta device; the family is the model's class name."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mixacm.models import build_model

    ds = assumptions()["datasets"][dataset]
    with torch.device("meta"):
        net = build_model(arch, num_classes=ds["classes"]).eval()
        with FlopCounterMode(display=False) as counter:
            net(torch.empty(1, 3, ds["image_size"], ds["image_size"]))
    return float(counter.get_total_flops()), sum(p.numel() for p in net.parameters()), type(net).__name__


def gpu_hours(fwd_equivalents: float, arch: str, dataset: str, precision: str) -> float:
    """Hours of the assumed GPU for ``fwd_equivalents`` forward passes of ``arch`` at ``precision``."""
    flops, _, family = network_size(arch, dataset)
    a = assumptions()
    utilisation = a["utilisation"].get(family, a["utilisation"]["default"])
    return fwd_equivalents * flops / (a["device"]["peak_tflops"][precision] * 1e12 * utilisation) / 3600


def _run_id(dataset: str, recipe: str, arch: str, fraction: float, seed: int) -> str:
    return f"{dataset}/{recipe}/{arch}/frac{float(fraction)!r}/seed{seed}"


def _teacher_arch(cfg: Mapping, dataset: str, recipe: str) -> str | None:
    block = cfg["recipes"][recipe].get("teacher") or cfg["teachers"].get(dataset) or {}
    return block.get("arch")


def method_work(method: str, knobs: Any) -> tuple[float, float, float, int]:
    """(student passes, teacher forwards, attack iterations, replays) per training image of
    ``method`` with its resolved ``knobs`` (cost.yaml's ``methods``)."""
    entries = assumptions()["methods"]
    if method not in entries:
        raise KeyError(f"mixacm/cost.yaml has no work per image for method {method!r}; add it under methods")
    e = entries[method]
    steps = e.get("attack_steps", 0)
    steps = getattr(knobs, steps) if isinstance(steps, str) else steps
    replays = int(knobs.replays) if e.get("replays") else 1
    student, teacher, attack = float(e["student"]), float(e.get("teacher", 0)), steps * e.get("attack_share", 1.0)
    if "plain_share" in e:  # a first phase of plain steps (IGAM's CE-only phase): a standard step there
        plain = float(getattr(knobs, e["plain_share"]))
        student, teacher, attack = plain * 3 + (1 - plain) * student, (1 - plain) * teacher, (1 - plain) * attack
    return student, teacher, attack, replays


def train_job(cfg: Mapping, dataset: str, recipe: str, arch: str, fraction: float, seed: int,
              run: str | None = None) -> JobCost:
    """The GPU-hours and disk of one training run of the validated pipeline config ``cfg``."""
    from mixacm.config import check_pipeline_recipe, method_knobs, resolve_recipe
    from mixacm.methods import METHODS

    method = cfg["recipes"][recipe]["method"]
    cls = METHODS.get(method)
    run_cfg = check_pipeline_recipe(cfg, recipe, dataset=dataset, arch=arch,
                                    teacher="teacher.pt" if cls.needs_teacher else None)
    optim, train = resolve_recipe(run_cfg), run_cfg["train"]
    ds = assumptions()["datasets"][dataset]
    n_train = (ds["train_images"] - cfg["data"][dataset]["holdout"]) * float(fraction)
    steps_per_epoch = max(1, int(n_train // optim["batch_size"]))
    steps_per_epoch = min(steps_per_epoch, train.get("max_steps_per_epoch") or steps_per_epoch)
    epochs = max(1, round(optim["steps"] / steps_per_epoch)) if optim.get("steps") else optim["epochs"]
    images = epochs * steps_per_epoch * optim["batch_size"]

    student, teacher, attack_steps, replays = method_work(method, cls.resolve(method_knobs(run_cfg), dataset))
    work = images * (student + teacher * flops_ratio(_teacher_arch(cfg, dataset, recipe), arch, dataset)
                     + 2 * attack_steps) * replays
    copies = assumptions()["disk"]["run_copies"]
    if train["selection"] == "best_pgd":
        work += epochs * train["selection_n"] * (2 + 2 * assumptions()["selection"]["pgd_steps"])
        copies += assumptions()["disk"]["best_pgd_copies"]
    precision = assumptions()["precision"][train["amp"]]
    return JobCost("train", run or _run_id(dataset, recipe, arch, fraction, seed), dataset, precision,
                   int(cfg["resources"][dataset]["train"]["gpu"]), gpu_hours(work, arch, dataset, precision),
                   network_size(arch, dataset)[1] * assumptions()["disk"]["bytes_per_param"] * copies / 1e9)


def flops_ratio(other: str | None, arch: str, dataset: str) -> float:
    """FLOPs of a forward pass of ``other`` (a teacher, a transfer source) per one of ``arch``;
    1 when ``other`` is not named (a model file without ``arch``: priced as the student)."""
    return network_size(other, dataset)[0] / network_size(arch, dataset)[0] if other else 1.0


def autoattack_work(version: str, dataset: str) -> float:
    """Forward-equivalents per test point of an AutoAttack version (``autoattack``,
    ``autoattack-apgd``, ``autoattack-rand``): each attack on the points the previous ones left
    correct (the dataset's clean share for the first, its robust share for the rest)."""
    a, ds = assumptions()["autoattack"], assumptions()["datasets"][dataset]
    targets = min(a["max_targets"], ds["classes"] - 1)
    apgd = 2 * a["apgd_iterations"]
    if version == "autoattack":
        later = apgd * targets + 2 * a["fab_iterations"] * targets + a["square_queries"]
        return 1 + apgd * ds["clean_share"] + later * ds["robust_share"]
    if version == "autoattack-apgd":
        return 1 + apgd * ds["clean_share"] + apgd * targets * ds["robust_share"]
    if version == "autoattack-rand":
        eot = a["eot_iterations"]
        return 1 + apgd * eot * ds["clean_share"] + apgd * eot * ds["robust_share"]
    raise ValueError(f"unknown AutoAttack version {version!r}")


def audit_work(settings: Mapping, dataset: str, source_ratios: list[float]) -> float:
    """Forward-equivalents per audited point (mixacm.audit): PGD-20, the strong PGD on the points
    it leaves correct, APGD-DLR and Square on the subset, a PGD-20 crafted on each transfer source
    (FLOPs ratios to the audited model) and the eps sweep."""
    a, ds = assumptions()["autoattack"], assumptions()["datasets"][dataset]
    subset = settings["subset_n"] / settings["n"]
    work = 41.0 + settings["pgd_restarts"] * (2 * settings["pgd_steps"] + 1) * ds["robust_share"]
    work += subset * (2 * a["apgd_iterations"] * ds["robust_share"] + settings["square_queries"] * ds["clean_share"])
    work += sum(41 * ratio + 1 for ratio in source_ratios)
    return work + len(settings["eps_multipliers"]) * (2 * settings["sweep_steps"] + 1)


def _points(n: int | None, dataset: str) -> int:
    return assumptions()["datasets"][dataset]["test_images"] if n is None else int(n)


def eval_job(cfg: Mapping, kind: str, run: str, dataset: str, arch: str, source_ratios: list[float] = ()) -> JobCost:
    """One evaluation job (clean_pgd, autoattack, autoattack_standard, audit) of the model ``arch``."""
    from mixacm.audit import audit_settings

    ev = cfg["evaluation"][dataset]
    if kind == "clean_pgd":
        per_point = sum(1 if a == "clean" else 2 * int(a[3:]) + 1 for a in ev["clean_pgd"]["attacks"])
        points = _points(ev["clean_pgd"]["n"], dataset)
    elif kind == "audit":
        settings = audit_settings(ev.get("audit"))
        per_point, points = audit_work(settings, dataset, list(source_ratios)), settings["n"]
    else:
        block = ev[kind]
        per_point = autoattack_work(block.get("version", "autoattack"), dataset)
        points = _points(block["n"], dataset)
    precision = assumptions()["precision"]["none"]
    gpus = int(cfg["resources"][dataset][JOB_RESOURCES[kind]]["gpu"])
    return JobCost(kind, run, dataset, precision, gpus, gpu_hours(per_point * points, arch, dataset, precision))


def _at_source(cfg: Mapping, run: tuple, audited: set[tuple]) -> bool:
    """Whether the audit of ``run`` attacks it with examples from a PGD-AT run of the same
    dataset, arch, fraction and seed in an audited experiment (the workflow's transfer source)."""
    ds, recipe, arch, fraction, seed = run
    return any(r[0] == ds and r[2] == arch and r[3] == fraction and r[4] == seed and r[1] != recipe
               and cfg["recipes"][r[1]]["method"] == "at" for r in audited)


def pipeline_jobs(cfg: Mapping) -> list[JobCost]:
    """Every GPU job of the default target (``all``) of the validated pipeline config ``cfg``,
    each run's training and evaluations once (runs shared between tables are trained once)."""
    from mixacm.config import evaluated_runs, experiment_runs
    from mixacm.methods import METHODS

    names = list(cfg["experiments"])
    runs = list(dict.fromkeys(r for n in names for r in experiment_runs(cfg, n)))
    jobs = [train_job(cfg, *run) for run in runs]
    used = {run[0] for run in runs}
    for ds, t in cfg["teachers"].items():
        if t["source"] == "train" and ds in used:
            jobs.append(train_job(cfg, ds, t["recipe"], t["arch"], t["fraction"], t["seed"], run=f"teachers/{ds}/trained"))
    evals: dict[tuple, tuple] = {}
    audited = {r for n in names for r in evaluated_runs(cfg, n, "audit")}
    for n in names:
        standard = set(cfg["experiments"][n].get("autoattack_standard", []))
        evals.update({("clean_pgd", r): r for r in experiment_runs(cfg, n)})
        evals.update({("autoattack", r): r for r in evaluated_runs(cfg, n, "autoattack")})
        evals.update({("autoattack_standard", r): r for r in experiment_runs(cfg, n) if r[1] in standard})
    for (kind, run) in evals:
        jobs.append(eval_job(cfg, kind, _run_id(*run), run[0], run[2]))
    for run in dict.fromkeys(r for n in names for r in evaluated_runs(cfg, n, "audit")):
        ds, recipe, arch = run[:3]
        sources = [flops_ratio(_teacher_arch(cfg, ds, recipe), arch, ds)] if METHODS.get(
            cfg["recipes"][recipe]["method"]).needs_teacher else []
        sources += [1.0] if _at_source(cfg, run, audited) else []
        jobs.append(eval_job(cfg, "audit", _run_id(*run), ds, arch, sources))
    return jobs + _teacher_evaluations(cfg)


def _teacher_evaluations(cfg: Mapping) -> list[JobCost]:
    """The transfer table's Teacher row: clean + PGD, AutoAttack unless the experiment's
    autoattack is false, the audit when its audit is on."""
    exp = cfg["experiments"].get("transfer")
    if not exp or exp["dataset"] not in cfg["teachers"]:
        return []
    ds = exp["dataset"]
    arch = cfg["teachers"][ds].get("arch") or exp["arch"]
    kinds = ["clean_pgd"] + ["autoattack"] * (exp.get("autoattack", True) is not False)
    kinds += ["audit"] * (exp.get("audit", False) is not False)
    return [eval_job(cfg, kind, f"teachers/{ds}", ds, arch) for kind in kinds]


def disk_gb(cfg: Mapping, jobs: list[JobCost]) -> float:
    """GB on disk at the end of the run: the networks the runs keep, each imported teacher's file
    and downloaded checkpoint, and the CIFAR download and cache of the datasets used."""
    d = assumptions()["disk"]
    blocks = [(ds, t) for ds, t in cfg["teachers"].items()]
    blocks += [(ds, r["teacher"]) for r in cfg["recipes"].values() if r.get("teacher")
               for ds in {e["dataset"] for e in cfg["experiments"].values()}]
    teachers = sum(network_size(t["arch"], ds)[1] * d["bytes_per_param"] * d["teacher_copies"] / 1e9
                   for ds, t in blocks if t["source"] != "train" and t.get("arch"))
    datasets = {job.dataset for job in jobs}
    return sum(job.disk_gb for job in jobs) + teachers + sum(d["dataset_gb"].get(ds, 0) for ds in datasets)


def summary(cfg: Mapping) -> str:
    """What a dry run prints before its plan: the GPU-hours of the whole config, by dataset and
    kind, the longest job against its time limit, and the disk it needs."""
    jobs = pipeline_jobs(cfg)
    if not jobs:
        return "estimated cost: no GPU jobs"
    total = sum(j.gpu_hours for j in jobs)
    parts = []
    for ds in sorted({j.dataset for j in jobs}):
        train = sum(j.gpu_hours for j in jobs if j.dataset == ds and j.kind == "train")
        rest = sum(j.gpu_hours for j in jobs if j.dataset == ds and j.kind != "train")
        parts.append(f"{ds} {train:,.1f} training + {rest:,.1f} evaluation")
    longest = max(jobs, key=lambda j: j.wall_hours)
    limit = cfg["resources"][longest.dataset][JOB_RESOURCES[longest.kind]]["runtime"] / 60
    over = [j for j in jobs if j.wall_hours > cfg["resources"][j.dataset][JOB_RESOURCES[j.kind]]["runtime"] / 60]
    device = assumptions()["device"]["name"]
    lines = [
        f"estimated cost of this config (all its jobs, done or not; one {device}, assumptions in "
        f"mixacm/cost.yaml): {total:,.1f} GPU-hours ({'; '.join(parts)}), {len(jobs)} GPU jobs",
        f"  longest job: {longest.kind} {longest.run}, {longest.wall_hours:,.1f} h on {max(1, longest.gpus)} "
        f"GPU(s) (time limit {limit:g} h)" + (f"; {len(over)} job(s) estimated beyond their time limit "
                                              "resume when resubmitted" if over else ""),
        f"  disk: {disk_gb(cfg, jobs):,.1f} GB (checkpoints, teachers, CIFAR download and cache; not ImageNet)",
    ]
    return "\n".join(lines)


def markdown_table(cfg: Mapping) -> str:
    """The estimate per run (training and each evaluation, GPU-hours) and in total, as Markdown."""
    jobs = pipeline_jobs(cfg)
    kinds = ["train", "clean_pgd", "autoattack", "autoattack_standard", "audit"]
    kinds = [k for k in kinds if any(j.kind == k for j in jobs)]
    runs = list(dict.fromkeys(j.run for j in jobs))
    head = ["run", "precision", "GPUs", *kinds, "total", "wall h"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        mine = {j.kind: j for j in jobs if j.run == run}
        train = mine.get("train")
        cells = [f"{mine[k].gpu_hours:.2f}" if k in mine else "" for k in kinds]
        total = sum(j.gpu_hours for j in mine.values())
        rows.append("| " + " | ".join([run, train.precision if train else "tf32", str(train.gpus if train else 1),
                                       *cells, f"{total:.2f}", f"{sum(j.wall_hours for j in mine.values()):.2f}"]) + " |")
    sums = [f"**{sum(j.gpu_hours for j in jobs if j.kind == k):.1f}**" for k in kinds]
    rows.append("| " + " | ".join(["**total**", "", "", *sums, f"**{sum(j.gpu_hours for j in jobs):.1f}**", ""]) + " |")
    return "\n".join(rows)
