# The robustness audit (mixacm audit) of every trained model of an experiment whose `audit`
# switch is on (default: the main comparison, experiments.cifar10), and of the transfer table's
# teacher when experiments.transfer.audit is on: stronger PGD, APGD-DLR and Square on a subset,
# transfer attacks from the teacher (distilled students) and the PGD-AT run, an eps sweep. Its
# `audited` metric is a table column; the sweep is a figure.

# Drawing the sweep takes seconds and reads only result files: it runs where snakemake runs.
localrules:
    render_eps_sweep,


rule audit_model:
    input:
        unpack(audit_inputs),
    output:
        f"{RUN_PATTERN}/eval_audit.json",
    params:
        args=lambda w: eval_args(eval_subject(RUN_ID.format(**dict(w.items())))),
        sources=audit_source_args,
        aa=lambda w, input: f"--autoattack-result {input.aa}" if "aa" in input.keys() else "",
        settings=lambda w: json.dumps(config["evaluation"][w.dataset].get("audit", {}), sort_keys=True),
    threads: res("autoattack", "threads")
    resources:
        mem_mb=res("autoattack", "mem_mb"),
        runtime=res("autoattack", "runtime"),
        gpu=res("autoattack", "gpu"),
    log:
        f"{LOG_PATTERN}/audit.log",
    benchmark:
        f"{RUN_PATTERN}/benchmark_audit.tsv"
    priority: AUDIT_CHAIN_PRIORITY
    conda:
        "../../environment.yml"
    shell:
        "OMP_NUM_THREADS={threads} mixacm audit --checkpoint {input.model} {params.args}"
        " {params.sources} {params.aa} --settings {params.settings:q} --out {output} > {log} 2>&1"


# The teacher of the transfer table, audited like its students (no transfer sources: it is the
# source) when experiments.transfer.audit is on.
rule audit_teacher:
    input:
        unpack(teacher_audit_inputs),
    output:
        "results/teachers/{dataset}/eval_audit.json",
    params:
        args=lambda w: eval_args(eval_subject(f"teachers/{w.dataset}")),
        aa=lambda w, input: f"--autoattack-result {input.aa}" if "aa" in input.keys() else "",
        settings=lambda w: json.dumps(config["evaluation"][w.dataset].get("audit", {}), sort_keys=True),
    threads: res("autoattack", "threads")
    resources:
        mem_mb=res("autoattack", "mem_mb"),
        runtime=res("autoattack", "runtime"),
        gpu=res("autoattack", "gpu"),
    log:
        "logs/teachers/{dataset}/audit.log",
    benchmark:
        "results/teachers/{dataset}/benchmark_audit.tsv"
    conda:
        "../../environment.yml"
    shell:
        "OMP_NUM_THREADS={threads} mixacm audit --checkpoint {input.model} {params.args}"
        " {params.aa} --settings {params.settings:q} --out {output} > {log} 2>&1"


rule render_eps_sweep:
    input:
        audits=lambda w: AUDIT_RESULTS,
    output:
        "results/figures/eps_sweep.png",
    params:
        config=CONFIG_FILE,
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=0,
    log:
        "logs/report/eps_sweep.log",
    benchmark:
        "results/benchmarks/render_eps_sweep.tsv"
    conda:
        "../../environment.yml"
    shell:
        "mixacm sweep-figure --audits {input.audits:q} --config {params.config:q} --out {output} > {log} 2>&1"
