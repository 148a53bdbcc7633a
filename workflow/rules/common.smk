# Shared helpers: checks the JSON schema cannot express, the list of training runs behind each
# table, the per-run config written for `mixacm train` (mixacm.config.pipeline_run_config: the
# schema has filled in every default by now, so none is written here), and result paths named by
# conditions:
#   results/{dataset}/{method}/{arch}/frac{fraction}/seed{seed}/...
# where {method} is a recipe name (a method plus its knobs, e.g. mixacm_acm_only).

import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from shlex import quote as shell_quote
from types import SimpleNamespace

import yaml
from snakemake.logging import logger
from snakemake.utils import update_config, validate

from mixacm.config import (ConfigError, check_pipeline_recipe, check_recipe_block, check_recipe_label,
                           pipeline_run_config, run_config_hash, teacher_source)
from mixacm.config import evaluated_runs as pipeline_evaluated_runs, experiment_runs as pipeline_experiment_runs
from mixacm.cost import summary as cost_summary
from mixacm.inputs import PipelineInputError, check_pipeline_data, check_pipeline_inputs, robustbench_errors
from mixacm.methods import METHODS
from mixacm.report.figures import FIGURE_NAMES
from mixacm.utils import YAMLFileError, load_yaml, parse_linf_eps, portable_path


# Snakemake reads the config files with YAML's last-key-wins; read each again with the project's
# one loader, which refuses a key given twice (both line numbers), before anything else.
for _configfile in workflow.configfiles:
    try:
        load_yaml(_configfile)
    except YAMLFileError as err:
        raise WorkflowError(f"invalid config: {err}") from None


# Nested --config values arrive as strings (Snakemake reads them with YAML's BaseLoader): read each
# string as a YAML scalar, as a config file would be, so --config 'recipes={at: {optim: {epochs: 1}}}'
# sets the number 1. Strings that YAML reads as anything but a number, boolean or null stay strings.
def _yaml_typed(value):
    if isinstance(value, str) and value.strip():
        try:
            typed = load_yaml("--config value", text=value)
        except YAMLFileError:
            return value
        return typed if typed is None or isinstance(typed, (bool, int, float)) else value
    if isinstance(value, Mapping):
        return {k: _yaml_typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml_typed(v) for v in value]
    return value


update_config(config, _yaml_typed(workflow.config_settings.config))

# Before any job: unknown keys, wrong types and out-of-range values name the offending key.
try:
    validate(config, "../schemas/config.schema.yaml")
except WorkflowError as err:
    cause = err.__context__  # the jsonschema ValidationError
    if not hasattr(cause, "absolute_path"):
        raise
    key = ".".join(map(str, cause.absolute_path)) or "(top level)"
    hint = "; eps is a fraction of the [0, 1] range: write 8/255, not 8" if key.endswith("eps") else ""
    raise WorkflowError(f"invalid config: key {key}: {cause.message}{hint}") from None


# jsonschema validation has already named the key for unknown keys and wrong types; these checks
# cover eps strings ("300/255"), each recipe as `mixacm train` will read it (the run config schema,
# the method's knobs, the resolved optimiser recipe) and cross-references, and also name the key.
def _parse_eps(value, key):
    try:
        return parse_linf_eps(value, beyond="the pipeline stays within it (mixacm evaluate --allow-large-eps goes beyond)")
    except ValueError as err:
        raise WorkflowError(f"config key {key}: {err}")


def _check_config(cfg):
    for ds, ev in cfg["evaluation"].items():
        _parse_eps(ev["eps"], f"evaluation.{ds}.eps")
    for name, recipe in cfg["recipes"].items():
        if recipe["method"] not in METHODS:
            raise WorkflowError(
                f"config key recipes.{name}.method: unknown method {recipe['method']!r}; "
                f"valid: {', '.join(METHODS.names())}"
            )
        try:
            check_recipe_label(cfg, name)
        except ConfigError as err:
            raise WorkflowError(f"config key {err}")
    for exp_name, exp in cfg["experiments"].items():
        for i, recipe in enumerate(exp["recipes"]):
            if recipe not in cfg["recipes"]:
                raise WorkflowError(
                    f"config key experiments.{exp_name}.recipes[{i}]: unknown recipe {recipe!r}; "
                    f"defined under recipes: {', '.join(sorted(cfg['recipes']))}"
                )
            # No silent fallback to another dataset's recipe: the method must have one for this dataset.
            method = METHODS.get(cfg["recipes"][recipe]["method"])
            if exp["dataset"] not in method.recipe_datasets():
                raise WorkflowError(
                    f"config key experiments.{exp_name}.recipes[{i}]: method {method.name!r} (recipe "
                    f"{recipe!r}) has no recipe for dataset {exp['dataset']!r}; it has recipes for: "
                    f"{', '.join(method.recipe_datasets()) or 'none'}"
                )
        if exp["dataset"] not in cfg["evaluation"]:
            raise WorkflowError(
                f"config key experiments.{exp_name}.dataset: {exp['dataset']!r} has no "
                f"evaluation.{exp['dataset']} section (eps, test points)"
            )
        for key in ("autoattack", "autoattack_standard", "audit", "recipe_seeds", "recipe_fractions"):
            listed = exp.get(key)
            # a list names recipes by position ([i]), the recipe_seeds mapping by key (.name)
            named = ([(f"[{i}]", r) for i, r in enumerate(listed)] if isinstance(listed, list)
                     else [(f".{r}", r) for r in listed] if isinstance(listed, dict) else [])
            for where, recipe in named:
                if recipe not in exp["recipes"]:
                    raise WorkflowError(
                        f"config key experiments.{exp_name}.{key}{where}: recipe "
                        f"{recipe!r} is not one of this experiment's recipes ({', '.join(exp['recipes'])})"
                    )
        if exp.get("autoattack_standard") and "autoattack_standard" not in cfg["evaluation"][exp["dataset"]]:
            raise WorkflowError(
                f"config key experiments.{exp_name}.autoattack_standard: set "
                f"evaluation.{exp['dataset']}.autoattack_standard.n (test points) as well"
            )
        needs_teacher = any(
            cfg["recipes"][r]["method"] in TEACHER_METHODS for r in exp["recipes"]
        )
        if needs_teacher and exp["dataset"] not in cfg["teachers"]:
            raise WorkflowError(
                f"config key experiments.{exp_name}: its recipes need a teacher but "
                f"teachers.{exp['dataset']} is not set"
            )
        _check_feature_names(cfg, exp_name, exp)
    for name, recipe in cfg["recipes"].items():
        teacher = recipe.get("teacher")
        if not teacher:
            continue
        if recipe["method"] not in TEACHER_METHODS:
            raise WorkflowError(
                f"config key recipes.{name}.teacher: method {recipe['method']!r} does not distil from a teacher"
            )
        if teacher["source"] == "train":
            raise WorkflowError(
                f"config key recipes.{name}.teacher.source: a recipe's own teacher is imported "
                "(robustbench, url or file); a teacher trained in the DAG belongs under teachers.<dataset>"
            )
    # Every teacher block, the datasets' and the recipes' own: a named file must exist.
    blocks = [(f"teachers.{ds}", t) for ds, t in cfg["teachers"].items()]
    blocks += [(f"recipes.{name}.teacher", r["teacher"]) for name, r in cfg["recipes"].items() if r.get("teacher")]
    for key, teacher in blocks:
        if teacher["source"] == "file" and not Path(teacher["path"]).is_file():
            raise WorkflowError(f"config key {key}.path: teacher file {teacher['path']!r} does not exist")
    for ds, teacher in cfg["teachers"].items():
        if teacher["source"] == "train" and teacher["recipe"] not in cfg["recipes"]:
            raise WorkflowError(
                f"config key teachers.{ds}.recipe: unknown recipe {teacher['recipe']!r}"
            )
    # Every (recipe, dataset, arch) that will be trained, read as `mixacm train` reads it.
    trained = {(r, exp["dataset"], exp["arch"]) for exp in cfg["experiments"].values() for r in exp["recipes"]}
    trained |= {(t["recipe"], ds, t["arch"]) for ds, t in cfg["teachers"].items() if t["source"] == "train"}
    same_run = {}  # (dataset, arch, config hash) -> recipe: two recipes that train the same run
    for recipe, dataset, arch in sorted(trained):
        needs = cfg["recipes"][recipe]["method"] in TEACHER_METHODS
        try:
            run = check_pipeline_recipe(cfg, recipe, dataset=dataset, arch=arch,
                                        teacher=teacher_file(dataset, recipe) if needs else None)
        except ConfigError as err:
            raise WorkflowError(f"config key {err}")
        other = same_run.setdefault((dataset, arch, run_config_hash(run)), recipe)
        if other != recipe:
            raise WorkflowError(
                f"config key recipes.{recipe}: trains the same {arch} run on {dataset} as recipes.{other} "
                "(same method, knobs, optim and train settings): its results would duplicate the other's; "
                "make them differ or drop one")
    # Recipes no run uses have no dataset to resolve against: method, knobs, optim and train are
    # still checked, against the same registry and run-config schema.
    for name in sorted(set(cfg["recipes"]) - {r for r, _, _ in trained}):
        try:
            check_recipe_block(cfg, name)
        except ConfigError as err:
            raise WorkflowError(f"config key {err}")


def _check_feature_names(cfg, exp_name, exp):
    # Knobs naming features (MixACM's distillation-term block pairs) against the student's and
    # the teacher's architectures, read from the model registry without building weights.
    from mixacm.distill import arch_feature_names

    for recipe in exp["recipes"]:
        cls = METHODS.get(cfg["recipes"][recipe]["method"])
        teacher = cfg["recipes"][recipe].get("teacher") or cfg["teachers"].get(exp["dataset"], {})
        if not cls.needs_teacher or not teacher.get("arch"):
            continue  # a teacher file without arch: checked by the run config once the file exists
        names = arch_feature_names(exp["arch"]), arch_feature_names(teacher["arch"])
        try:
            cls.check_feature_names(cfg["recipes"][recipe].get("knobs", {}), *names)
        except ValueError as err:
            raise WorkflowError(
                f"config key recipes.{recipe}.knobs (student {exp['arch']} of experiments.{exp_name}, "
                f"teacher {teacher['arch']}): {err}"
            )


# Methods that distil from a teacher (Method.needs_teacher in the registry).
TEACHER_METHODS = {name for name in METHODS.names() if METHODS.get(name).needs_teacher}


# The SLURM profile ships the account as a placeholder to fill in (docs/slurm.md). A plan (-n)
# shows it with a warning; a real run stops before its first job, naming the key.
SLURM_ACCOUNT_PLACEHOLDER = "CHANGE_ME"


def placeholder_account():
    """The message for a placeholder slurm_account among the default resources, else None."""
    defaults = workflow.resource_settings.default_resources
    for arg in getattr(defaults, "args", None) or []:
        key, _, value = str(arg).partition("=")
        if key.strip() == "slurm_account" and value.strip().strip("'\"") == SLURM_ACCOUNT_PLACEHOLDER:
            return (f"default-resources.slurm_account is the placeholder {SLURM_ACCOUNT_PLACEHOLDER!r} "
                    "(workflow/profiles/slurm/config.yaml): set it to your account (sacctmgr -nP show "
                    "assoc user=$USER format=account), or delete the line on a cluster without accounts")
    return None


if placeholder_account():
    logger.warning(f"Warning: {placeholder_account()}; a real run stops before submitting any job.")


# Before the first job of a real run (a dry run needs no data): the SLURM account, then the data
# roots and teacher files of the datasets the jobs about to run use, every problem at once, each
# named by its pipeline key (mixacm.inputs).
onstart:
    if placeholder_account():
        raise WorkflowError(placeholder_account())
    try:
        _datasets = _datasets_of_jobs(workflow.dag.needrun_jobs())
        check_pipeline_inputs(config, datasets=_datasets)
        # then what the data folders say about themselves: every image decodes and is what the
        # dataset's images are, the splits agree on their classes and do not share images
        check_pipeline_data(config, datasets=_datasets)
    except PipelineInputError as err:
        raise WorkflowError(str(err)) from None


# The rules whose jobs read a dataset (teacher imports only where it is at hand, for their
# accuracy check; config writers and renderers never).
DATA_RULES = {"train_teacher", "train_student", "evaluate_model", "audit_model", "audit_teacher"}


def _datasets_of_jobs(jobs):
    """The datasets the jobs about to run read (jobs of DATA_RULES): their {dataset} wildcard, or
    the dataset of an evaluation's {subject} (<dataset>/... or teachers/<dataset>)."""
    out = set()
    for job in jobs:
        if job.rule.name not in DATA_RULES:
            continue
        w = dict(job.wildcards.items())
        if "dataset" in w:
            out.add(w["dataset"])
        elif "subject" in w:
            parts = w["subject"].split("/")
            out.add(parts[1] if parts[0] == "teachers" else parts[0])
    return out


def frac_str(fraction):
    """The {fraction} wildcard: 1.0 -> "1.0", 0.05 -> "0.05" (Python's shortest repr)."""
    return repr(float(fraction))


def run_dir(dataset, method, arch, fraction, seed):
    return f"results/{dataset}/{method}/{arch}/frac{frac_str(fraction)}/seed{seed}"


RUN_ID = "{dataset}/{method}/{arch}/frac{fraction}/seed{seed}"
RUN_PATTERN = f"results/{RUN_ID}"
LOG_PATTERN = f"logs/{RUN_ID}"
# mixacm.report.collect_costs matches a benchmark file to its run by the run name (RUN_ID)
# ending the file's path.
TRAIN_BENCHMARK = f"results/benchmarks/train/{RUN_ID}.tsv"


def experiment_runs(name):
    """(dataset, recipe, arch, fraction, seed) of every training run behind one table."""
    return pipeline_experiment_runs(config, name)


def experiment_files(name, filename):
    return [f"{run_dir(*run)}/{filename}" for run in experiment_runs(name)]


def experiment_benchmarks(name):
    return [f"results/benchmarks/train/{run_dir(*run).removeprefix('results/')}.tsv"
            for run in experiment_runs(name)]


def resources_of(dataset, kind):
    """threads, mem_mb, runtime, gpu of a job kind (the schema fills in the defaults)."""
    return config["resources"][dataset][kind]


def res(kind, key):
    """A resource of a job kind ("teacher", "train", "evaluate", "autoattack") per dataset."""
    return lambda w: resources_of(w.dataset, kind)[key]


def teacher_id(dataset, recipe=None):
    """Which teacher a run of {recipe} on {dataset} distils from: "<dataset>" (teachers.<dataset>)
    or "<dataset>/<recipe>" when the recipe names its own (recipes.<recipe>.teacher)."""
    if recipe is not None and config["recipes"][recipe].get("teacher"):
        return f"{dataset}/{recipe}"
    return dataset


def teacher_block(tid):
    """The config block of a teacher id (teacher_id): teachers.<dataset> or recipes.<recipe>.teacher."""
    dataset, _, recipe = tid.partition("/")
    return config["recipes"][recipe]["teacher"] if recipe else config["teachers"][dataset]


def teacher_file(dataset, recipe=None):
    """Where the teacher model file of a run's students comes from, one rule per source
    (results/teachers/<teacher id>/<source>/model.pt), or the DAG-trained dataset teacher."""
    tid = teacher_id(dataset, recipe)
    source = teacher_block(tid)["source"]
    if source == "train":
        return f"results/teachers/{dataset}/trained/model.pt"
    return f"results/teachers/{tid}/{source}/model.pt"


def teacher_dataset(tid):
    """The dataset of a teacher id (teacher_id)."""
    return tid.partition("/")[0]


def teacher_res(key):
    """A resource of a teacher import job ({teacher} wildcard: a teacher id), per its dataset."""
    return lambda w: resources_of(teacher_dataset(w.teacher), "teacher")[key]


_check_config(config)


# A RobustBench teacher without the `robustbench` extra would fail at its first job: refused now,
# on a dry run too, with the install line that works (mixacm.inputs).
_robustbench_errors = robustbench_errors(config)
if _robustbench_errors:
    raise WorkflowError(_robustbench_errors[0])


# A config that asks for GPUs says its price before the plan (dry runs too): the estimated
# GPU-hours, the longest job against its time limit and the disk (mixacm.cost; the table per job
# is in docs/benchmarks.md). Only the Snakemake the user started prints it, not each cluster job's.
if workflow.is_main_process and any(job["gpu"] for ds in config["resources"].values() for job in ds.values()):
    print(cost_summary(config), file=sys.stderr)


def teacher_source_json(tid):
    """A teacher block (teacher id: teacher_id) as `mixacm teacher --source-json` reads it."""
    return json.dumps(teacher_source(teacher_block(tid), teacher_dataset(tid)), sort_keys=True)


def student_config(w):
    """The run config of a student (docs/architecture.md, "The run config")."""
    method = config["recipes"][w.method]["method"]
    return pipeline_run_config(
        config, dataset=w.dataset, recipe=w.method, arch=w.arch, fraction=w.fraction, seed=w.seed,
        teacher=teacher_file(w.dataset, w.method) if method in TEACHER_METHODS else None,
        name=RUN_ID.format(**dict(w.items())),
    )


def teacher_config(w):
    """The run config of a teacher trained in the DAG (teachers.<dataset>.source: train)."""
    t = config["teachers"][w.dataset]
    return pipeline_run_config(
        config, dataset=w.dataset, recipe=t["recipe"], arch=t["arch"], fraction=t["fraction"], seed=t["seed"],
        name=f"teachers/{w.dataset}/trained",
    )


def as_yaml(cfg):
    return yaml.safe_dump(cfg, sort_keys=False)


def launcher(gpus):
    """`mixacm` for one process; torchrun with one process per GPU for multi-GPU jobs."""
    if int(gpus) > 1:
        return f"torchrun --standalone --nproc-per-node {int(gpus)} -m mixacm.cli"
    return "mixacm"


def teacher_label(dataset, recipe=None):
    """How the tables name a run's teacher (the dataset's, or its recipe's own): its RobustBench
    name, or its file and arch."""
    if teacher_id(dataset, recipe) == dataset and dataset not in config["teachers"]:
        return None
    t = teacher_block(teacher_id(dataset, recipe))
    if t["source"] == "robustbench":
        return t["name"]
    if t["source"] == "train":
        return f"{t['arch']} ({t['recipe']}, trained in the workflow)"
    origin = t["url"] if t["source"] == "url" else t["path"]
    return f"{t['arch'] or 'model file'} ({Path(origin).name})"


def run_info(w):
    """Conditions of a run, recorded in its result JSONs (the report groups rows by them)."""
    recipe = config["recipes"][w.method]
    method = recipe["method"]
    return json.dumps(
        {
            "recipe": w.method,
            "method": method,
            "variant": recipe.get("variant", recipe.get("knobs", {}).get("ablation")),
            "arch": w.arch,
            "teacher": teacher_label(w.dataset, w.method) if method in TEACHER_METHODS else None,
            "data_fraction": float(w.fraction),
            "seed": int(w.seed),
        },
        sort_keys=True,
    )


# -- evaluation -------------------------------------------------------------------------------


# {subject} of an evaluation: a student's run folder or teachers/{dataset} (evaluate.smk).
EVAL_SUBJECT_PATTERN = r"teachers/[^/]+|[^/]+/[^/]+/[^/]+/frac[^/]+/seed[0-9]+"
_STUDENT_SUBJECT = re.compile(
    r"(?P<dataset>[^/]+)/(?P<method>[^/]+)/(?P<arch>[^/]+)/frac(?P<fraction>[^/]+)/seed(?P<seed>[0-9]+)"
)


def eval_subject(subject):
    """The model an evaluation's {subject} names: its dataset, model file and the run info its
    result JSON records (a teacher is named in it as the tables name it)."""
    if subject.startswith("teachers/"):
        dataset = subject.split("/")[1]
        t = config["teachers"][dataset]
        info = json.dumps({"method": "teacher", "arch": t.get("arch"), "teacher": None,
                           "variant": teacher_label(dataset), "data_fraction": 1.0, "seed": 0},
                          sort_keys=True)
        return {"dataset": dataset, "model": teacher_file(dataset), "info": info}
    w = SimpleNamespace(**_STUDENT_SUBJECT.fullmatch(subject).groupdict())
    return {"dataset": w.dataset, "model": f"results/{subject}/model.pt", "info": run_info(w)}


def eval_args(subject):
    """`mixacm evaluate` arguments of an eval_subject (data location, threat model, run info)."""
    dataset = subject["dataset"]
    ev = config["evaluation"][dataset]
    root = config["data"][dataset]["root"]
    args = [
        f"--dataset {dataset}",
        f"--eps {shell_quote(str(ev['eps']))}",
        f"--batch-size {ev['batch_size']}",
        f"--seed {ev['seed']}",
        f"--device {config['device']}",
        f"--run-info {shell_quote(subject['info'])}",
    ]
    if root:
        args.append(f"--data-root {shell_quote(root)}")
    return " ".join(args)


def eval_spec(dataset, kind):
    """(--attacks value, --n argument) of evaluation {kind}: clean_pgd (every run), autoattack
    (evaluation.<dataset>.autoattack) or autoattack_standard (the standard version). An AutoAttack
    evaluation on other points than clean_pgd's also runs PGD-20 on its own points, so that the
    tables compare the two on the same points."""
    ev = config["evaluation"][dataset]
    if kind == "clean_pgd":
        return ",".join(ev["clean_pgd"]["attacks"]), n_arg(ev["clean_pgd"]["n"])
    version, n = (ev["autoattack"]["version"], ev["autoattack"]["n"]) if kind == "autoattack" else \
        ("autoattack", ev["autoattack_standard"]["n"])
    same_points = n == ev["clean_pgd"]["n"] or "pgd20" not in ev["clean_pgd"]["attacks"]
    return (version if same_points else f"pgd20,{version}"), n_arg(n)


# The resources.<dataset> entry each evaluation kind is scheduled with.
EVAL_JOB_KIND = {"clean_pgd": "evaluate", "autoattack": "autoattack", "autoattack_standard": "autoattack"}


def eval_res(key):
    """A resource of an evaluation job ({subject}'s dataset, the entry of its {kind})."""
    return lambda w: resources_of(eval_subject(w.subject)["dataset"], EVAL_JOB_KIND[w.kind])[key]


TEACHER_EVALS = [
    f"results/teachers/{ds}/eval_{kind}.json"
    for ds in config["teachers"] if ds in config["evaluation"]
    for kind in ("clean_pgd", "autoattack")
]


def n_arg(n):
    return "" if n is None else f"--n {n}"


# -- tables, figures, report ---------------------------------------------------------------------

TABLE_NAMES = ["cifar10", "imagenet", "less_data", "ablation", "transfer"]
# The config file in use (the last --configfile, else config/quick.yaml), relative to the
# checkout: the report names it and shows its header, which states the run's scale, and the
# figures of a config that calls itself a smoke run say so.
CONFIG_FILE = portable_path(workflow.configfiles[-1])
TABLES = expand("results/table_{table}.csv", table=TABLE_NAMES)
FIGURES = expand("results/figures/{figure}", figure=FIGURE_NAMES)


def experiment_results(name):
    """The result files behind one table: clean + PGD for every run, AutoAttack where the
    experiment asks for it (experiments.<name>.autoattack / autoattack_standard)."""
    exp = config["experiments"].get(name)
    if exp is None:
        return []
    files = experiment_files(name, "eval_clean_pgd.json")
    files += [f"{run_dir(*run)}/eval_autoattack.json" for run in evaluated_runs(name, "autoattack")]
    standard = set(exp.get("autoattack_standard", []))
    files += [f"{run_dir(*run)}/eval_autoattack_standard.json"
              for run in experiment_runs(name) if run[1] in standard]
    if name == "transfer" and exp["dataset"] in config["teachers"]:
        # The transfer table's Teacher row: the teacher's own evaluations (AutoAttack unless the
        # experiment's autoattack is false: a list of recipes keeps the reference row attacked).
        kinds = ["clean_pgd"] + (["autoattack"] if exp.get("autoattack", True) is not False else [])
        files += [f"results/teachers/{exp['dataset']}/eval_{kind}.json" for kind in kinds]
        files += TEACHER_AUDITS
    files += [f"{run_dir(*run)}/eval_audit.json" for run in evaluated_runs(name, "audit")]
    return files


def teacher_costs(name):
    """The training summary and benchmark of a teacher trained in the DAG, for the transfer
    table's cost."""
    exp = config["experiments"].get(name)
    if name != "transfer" or exp is None:
        return []
    teacher = config["teachers"].get(exp["dataset"])
    if teacher is None or teacher["source"] != "train":
        return []
    return [f"results/teachers/{exp['dataset']}/trained/train_summary.json",
            f"results/teachers/{exp['dataset']}/trained/benchmark_train.tsv"]


def table_inputs(table):
    return {
        "results": experiment_results(table),
        "costs": experiment_files(table, "train_summary.json") + experiment_benchmarks(table)
        + teacher_costs(table),
    }


def all_of(key):
    """Every table's files of one kind ("results" or "costs"), each once."""
    return sorted({f for t in TABLE_NAMES for f in table_inputs(t)[key]})


# -- teacher import (mixacm teacher) ---------------------------------------------------------------


def teacher_data_arg(w):
    """Test data for the import's accuracy check (else $MIXACM_DATA_<NAME>; none: not run)."""
    root = config["data"].get(teacher_dataset(w.teacher), {}).get("root")
    return f"--data-root {shell_quote(root)}" if root else ""


def report_teachers():
    """The teacher files of the datasets the experiments train on, and the recipes' own teachers
    (their import checks)."""
    runs = {(run[0], run[1]) for name in config["experiments"] for run in experiment_runs(name)}
    files = {teacher_file(ds) for ds, _ in runs if ds in config["teachers"]}
    files |= {teacher_file(ds, r) for ds, r in runs if teacher_id(ds, r) != ds}
    return sorted(files)


# -- robustness audit (mixacm audit, rules/audit.smk) ----------------------------------------------


def evaluated_runs(name, key):
    """The runs of experiment {name} that get evaluation {key} ("autoattack" or "audit";
    mixacm.config.evaluated_runs says which by default)."""
    return pipeline_evaluated_runs(config, name, key)


def _run_key(run):
    return (run[0], run[1], run[2], frac_str(run[3]), str(run[4]))


def _check_audit_settings(cfg):
    from mixacm.audit import AuditError, audit_settings

    for ds, ev in cfg["evaluation"].items():
        try:
            audit_settings(ev.get("audit"))
        except AuditError as err:
            raise WorkflowError(f"invalid config: key evaluation.{ds}.{str(err).removeprefix('audit: ')}") from None


_check_audit_settings(config)


def _at_model(w):
    """The PGD-AT run of the same dataset, arch, fraction and seed in an audited experiment."""
    for name in config["experiments"]:
        if not evaluated_runs(name, "audit"):
            continue
        for ds, recipe, arch, fraction, seed in experiment_runs(name):
            if ((ds, arch, frac_str(fraction), str(seed)) == (w.dataset, w.arch, w.fraction, w.seed)
                    and config["recipes"][recipe]["method"] == "at" and recipe != w.method):
                return f"{run_dir(ds, recipe, arch, fraction, seed)}/model.pt"
    return None


def audit_inputs(w):
    """The model, its transfer sources (teacher if distilled, the AT run) and its AutoAttack result."""
    inputs = {"model": f"{run_dir(w.dataset, w.method, w.arch, w.fraction, w.seed)}/model.pt"}
    if config["recipes"][w.method]["method"] in TEACHER_METHODS:
        inputs["teacher"] = teacher_file(w.dataset, w.method)
    at = _at_model(w)
    if at:
        inputs["at"] = at
    key = (w.dataset, w.method, w.arch, w.fraction, w.seed)
    if any(_run_key(r) == key for n in config["experiments"] for r in evaluated_runs(n, "autoattack")):
        inputs["aa"] = f"{run_dir(w.dataset, w.method, w.arch, w.fraction, w.seed)}/eval_autoattack.json"
    return inputs


def audit_source_args(w):
    sources = {k: v for k, v in audit_inputs(w).items() if k in ("teacher", "at")}
    return " ".join(f"--source {shell_quote(f'{k}={v}')}" for k, v in sorted(sources.items()))


def _teacher_audits():
    """The transfer table's Teacher row is audited when experiments.transfer.audit is on (true or
    a list of recipes): results/teachers/<dataset>/eval_audit.json, written by audit.smk."""
    exp = config["experiments"].get("transfer")
    if not exp or exp["dataset"] not in config["teachers"] or exp.get("audit", False) is False:
        return []
    return [f"results/teachers/{exp['dataset']}/eval_audit.json"]


def teacher_audit_inputs(w):
    """The teacher's model file and, where the transfer table attacks it, its AutoAttack result."""
    inputs = {"model": teacher_file(w.dataset)}
    if config["experiments"]["transfer"].get("autoattack", True) is not False:
        inputs["aa"] = f"results/teachers/{w.dataset}/eval_autoattack.json"
    return inputs


# Scheduling (Snakemake priorities, higher first): the DAG-trained teacher first (rule
# train_teacher: every distilled student waits for it), then the longest chain after it, a run
# that is audited: its training, its AutoAttack evaluation, its audit.
TEACHER_PRIORITY, AUDIT_CHAIN_PRIORITY = 100, 50


def audit_chain_priority(w):
    """AUDIT_CHAIN_PRIORITY for the training of a run that is audited, else 0."""
    key = (w.dataset, w.method, w.arch, w.fraction, w.seed)
    audited = any(_run_key(r) == key for n in config["experiments"] for r in evaluated_runs(n, "audit"))
    return AUDIT_CHAIN_PRIORITY if audited else 0


TEACHER_AUDITS = _teacher_audits()
AUDIT_RESULTS = TEACHER_AUDITS + sorted({f"{run_dir(*run)}/eval_audit.json"
                        for name in config["experiments"] for run in evaluated_runs(name, "audit")})
