# Evaluation of every trained student and of each dataset's teacher: one rule, one job and one
# result JSON per (model, kind). {subject} is a student's run folder
# ({dataset}/{method}/{arch}/frac{fraction}/seed{seed}) or teachers/{dataset}; {kind} is
#   clean_pgd            clean + PGD (evaluation.<dataset>.clean_pgd), every model
#   autoattack           evaluation.<dataset>.autoattack, runs of experiments with autoattack: true
#                        and the teacher; with PGD-20 on the same points when they are fewer than
#                        clean_pgd's (the tables set AutoAttack beside PGD-20 on its own points)
#   autoattack_standard  the standard AutoAttack, for the recipes an experiment lists under
#                        autoattack_standard
# AutoAttack is by far the slower one and takes the resources.<dataset>.autoattack entry
# (EVAL_JOB_KIND). The per-batch evaluation state lives beside the result but is not an output,
# so a killed evaluation resumes where it stopped.


# The teacher on the same test data and threat model as its students (clean + PGD, AutoAttack),
# a check that the robustness to transfer is there:  snakemake --cores all teacher_evaluation
rule teacher_evaluation:
    input:
        TEACHER_EVALS,


rule evaluate_model:
    input:
        model=lambda w: eval_subject(w.subject)["model"],
    output:
        "results/{subject}/eval_{kind}.json",
    wildcard_constraints:
        subject=EVAL_SUBJECT_PATTERN,
        kind="clean_pgd|autoattack|autoattack_standard",
    params:
        args=lambda w: eval_args(eval_subject(w.subject)),
        attacks=lambda w: eval_spec(eval_subject(w.subject)["dataset"], w.kind)[0],
        n=lambda w: eval_spec(eval_subject(w.subject)["dataset"], w.kind)[1],
        state=lambda w, output: f"{output[0]}.state",
    threads: eval_res("threads")
    resources:
        mem_mb=eval_res("mem_mb"),
        runtime=eval_res("runtime"),
        gpu=eval_res("gpu"),
    log:
        "logs/{subject}/evaluate_{kind}.log",
    benchmark:
        "results/{subject}/benchmark_evaluate_{kind}.tsv"
    priority: lambda w: 0 if w.kind == "clean_pgd" else AUDIT_CHAIN_PRIORITY
    conda:
        "../../environment.yml"
    shell:
        "OMP_NUM_THREADS={threads} mixacm evaluate --checkpoint {input.model} {params.args}"
        " --attacks {params.attacks} {params.n} --state-file {params.state} --out {output}"
        " > {log} 2>&1"
