# Evaluation of every trained student: clean + PGD in one job, AutoAttack in another (it is by
# far the slower one and is scheduled with its own resources). One result JSON each. The
# per-batch evaluation state lives beside the result but is not an output, so a killed
# evaluation resumes where it stopped.


rule evaluate_clean_pgd:
    input:
        model=f"{RUN_PATTERN}/model.pt",
    output:
        f"{RUN_PATTERN}/eval_clean_pgd.json",
    params:
        args=eval_args,
        attacks=lambda w: eval_spec(w.dataset, "clean_pgd")[0],
        n=lambda w: eval_spec(w.dataset, "clean_pgd")[1],
        state=lambda w, output: f"{output[0]}.state",
    threads: res("evaluate", "threads")
    resources:
        mem_mb=res("evaluate", "mem_mb"),
        runtime=res("evaluate", "runtime"),
        gpu=res("evaluate", "gpu"),
    log:
        f"{LOG_PATTERN}/evaluate_clean_pgd.log",
    benchmark:
        f"{RUN_PATTERN}/benchmark_evaluate_clean_pgd.tsv"
    conda:
        "../../environment.yml"
    shell:
        "OMP_NUM_THREADS={threads} mixacm evaluate --checkpoint {input.model} {params.args}"
        " --attacks {params.attacks} {params.n} --state-file {params.state} --out {output}"
        " > {log} 2>&1"


# {aa} is "autoattack" (evaluation.<dataset>.autoattack, every run of an experiment with
# autoattack: true) or "autoattack_standard" (the standard version, for the recipes an experiment
# lists under autoattack_standard).
rule evaluate_autoattack:
    input:
        model=f"{RUN_PATTERN}/model.pt",
    output:
        f"{RUN_PATTERN}/eval_{{aa}}.json",
    wildcard_constraints:
        aa="autoattack|autoattack_standard",
    params:
        args=eval_args,
        attacks=lambda w: eval_spec(w.dataset, w.aa)[0],
        n=lambda w: eval_spec(w.dataset, w.aa)[1],
        state=lambda w, output: f"{output[0]}.state",
    threads: res("autoattack", "threads")
    resources:
        mem_mb=res("autoattack", "mem_mb"),
        runtime=res("autoattack", "runtime"),
        gpu=res("autoattack", "gpu"),
    log:
        f"{LOG_PATTERN}/evaluate_{{aa}}.log",
    benchmark:
        f"{RUN_PATTERN}/benchmark_evaluate_{{aa}}.tsv"
    conda:
        "../../environment.yml"
    shell:
        "OMP_NUM_THREADS={threads} mixacm evaluate --checkpoint {input.model} {params.args}"
        " --attacks {params.attacks} {params.n} --state-file {params.state} --out {output}"
        " > {log} 2>&1"


# The teacher on the same test data and threat model as its students (clean + PGD, AutoAttack),
# a check that the robustness to transfer is there:  snakemake --cores all teacher_evaluation
rule teacher_evaluation:
    input:
        TEACHER_EVALS,


rule evaluate_teacher:
    input:
        model=lambda w: teacher_file(w.dataset),
    output:
        "results/teachers/{dataset}/eval_{kind}.json",
    wildcard_constraints:
        kind="clean_pgd|autoattack",
    params:
        args=teacher_eval_args,
        attacks=lambda w: eval_spec(w.dataset, w.kind)[0],
        n=lambda w: eval_spec(w.dataset, w.kind)[1],
        state=lambda w, output: f"{output[0]}.state",
    threads: eval_res("threads")
    resources:
        mem_mb=eval_res("mem_mb"),
        runtime=eval_res("runtime"),
        gpu=eval_res("gpu"),
    log:
        "logs/teachers/{dataset}/evaluate_{kind}.log",
    benchmark:
        "results/teachers/{dataset}/benchmark_evaluate_{kind}.tsv"
    conda:
        "../../environment.yml"
    shell:
        "OMP_NUM_THREADS={threads} mixacm evaluate --checkpoint {input.model} {params.args}"
        " --attacks {params.attacks} {params.n} --state-file {params.state} --out {output}"
        " > {log} 2>&1"
