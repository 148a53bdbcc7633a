# The robust teacher of each dataset's students, one rule per source. Every rule writes the
# project's model-file format (mixacm.checkpoint), so students load any teacher the same way, and
# passes the teachers.<dataset> block to `mixacm teacher` as mixacm.config.teacher_source reads it.
# {teacher} is a teacher id (common.smk, teacher_id): <dataset> for teachers.<dataset>, or
# <dataset>/<recipe> for a recipe's own teacher (recipes.<recipe>.teacher), imported the same way.
# Downloads run on the submitting host (localrules): compute nodes often have no internet.

localrules:
    fetch_teacher_robustbench,
    fetch_teacher_url,
    import_teacher_file,
    write_teacher_config,


rule fetch_teacher_robustbench:
    output:
        "results/teachers/{teacher}/robustbench/model.pt",
    params:
        source=lambda w: teacher_source_json(w.teacher),
        data=teacher_data_arg,
    threads: teacher_res("threads")
    resources:
        mem_mb=teacher_res("mem_mb"),
        runtime=teacher_res("runtime"),
        gpu=0,
    log:
        "logs/teachers/{teacher}/robustbench.log",
    benchmark:
        "results/teachers/{teacher}/robustbench/benchmark_teacher.tsv"
    conda:
        "../../environment.yml"
    shell:
        "mixacm teacher --source-json {params.source:q} {params.data} --out {output} > {log} 2>&1"


rule fetch_teacher_url:
    output:
        "results/teachers/{teacher}/url/model.pt",
    params:
        source=lambda w: teacher_source_json(w.teacher),
        data=teacher_data_arg,
    threads: teacher_res("threads")
    resources:
        mem_mb=teacher_res("mem_mb"),
        runtime=teacher_res("runtime"),
        gpu=0,
    log:
        "logs/teachers/{teacher}/url.log",
    benchmark:
        "results/teachers/{teacher}/url/benchmark_teacher.tsv"
    conda:
        "../../environment.yml"
    shell:
        "mixacm teacher --source-json {params.source:q} {params.data} --out {output} > {log} 2>&1"


rule import_teacher_file:
    input:
        lambda w: teacher_block(w.teacher)["path"],
    output:
        "results/teachers/{teacher}/file/model.pt",
    params:
        source=lambda w: teacher_source_json(w.teacher),
        data=teacher_data_arg,
    threads: teacher_res("threads")
    resources:
        mem_mb=teacher_res("mem_mb"),
        runtime=teacher_res("runtime"),
        gpu=0,
    log:
        "logs/teachers/{teacher}/file.log",
    benchmark:
        "results/teachers/{teacher}/file/benchmark_teacher.tsv"
    conda:
        "../../environment.yml"
    shell:
        "mixacm teacher --source-json {params.source:q} {params.data} --out {output} > {log} 2>&1"


rule write_teacher_config:
    output:
        "results/teachers/{dataset}/trained/run.yaml",
    params:
        text=lambda w: as_yaml(teacher_config(w)),
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
        gpu=0,
    log:
        "logs/teachers/{dataset}/write_config.log",
    benchmark:
        "results/benchmarks/write_teacher_config/{dataset}.tsv"
    priority: TEACHER_PRIORITY  # its job is the teacher's first step (Snakemake does not pass priorities up)
    conda:
        "../../environment.yml"
    # A shell command, not a `run:` block: Snakemake runs each `run:` job in a new Snakemake
    # process that parses the whole workflow again (seconds per job, for one small file).
    shell:
        "printf '%s' {params.text:q} > {output} 2> {log}"


# state.pt, metrics.jsonl and the log stay outside the declared outputs, so a killed job keeps
# its checkpoint and `mixacm train` resumes from it on the next run. The teacher is the critical
# path: every distilled student waits for it, so it starts before the jobs that do not need it.
rule train_teacher:
    input:
        "results/teachers/{dataset}/trained/run.yaml",
    output:
        model="results/teachers/{dataset}/trained/model.pt",
        summary="results/teachers/{dataset}/trained/train_summary.json",
    params:
        out_dir=subpath(output.model, parent=True),
        launch=lambda w, resources: launcher(resources.gpu),
    threads: res("teacher", "threads")
    resources:
        mem_mb=res("teacher", "mem_mb"),
        runtime=res("teacher", "runtime"),
        gpu=res("teacher", "gpu"),
    log:
        "logs/teachers/{dataset}/train.log",
    benchmark:
        "results/teachers/{dataset}/trained/benchmark_train.tsv"
    priority: TEACHER_PRIORITY
    conda:
        "../../environment.yml"
    shell:
        "OMP_NUM_THREADS={threads} {params.launch} train --config {input} --out-dir {params.out_dir}"
        " > {log} 2>&1"
