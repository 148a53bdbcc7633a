# Student training: one job per (dataset, recipe, arch, data fraction, seed). The run config is
# written from the pipeline config by its own small rule, so it can be read and re-run by hand
# (`mixacm train --config run.yaml --out-dir DIR`), and a config change re-triggers training.

localrules:
    write_run_config,


rule write_run_config:
    output:
        f"{RUN_PATTERN}/run.yaml",
    params:
        text=lambda w: as_yaml(student_config(w)),
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
        gpu=0,
    log:
        f"{LOG_PATTERN}/write_run_config.log",
    benchmark:
        f"results/benchmarks/write_run_config/{RUN_ID}.tsv"
    priority: audit_chain_priority
    conda:
        "../../environment.yml"
    # A shell command, not a `run:` block: Snakemake runs each `run:` job in a new Snakemake
    # process that parses the whole workflow again (seconds per job, for one small file).
    shell:
        "printf '%s' {params.text:q} > {output} 2> {log}"


# state.pt (rolling, every epoch) and metrics.jsonl are deliberately not outputs: Snakemake
# deletes a failed job's outputs, and the checkpoint must survive a killed job so that the next
# run resumes from it. Only the final model and the summary are declared.
rule train_student:
    input:
        config=f"{RUN_PATTERN}/run.yaml",
        teacher=lambda w: (
            teacher_file(w.dataset, w.method)
            if config["recipes"][w.method]["method"] in TEACHER_METHODS
            else []
        ),
    output:
        model=f"{RUN_PATTERN}/model.pt",
        summary=f"{RUN_PATTERN}/train_summary.json",
    params:
        out_dir=lambda w, output: Path(output.model).parent,
        launch=lambda w, resources: launcher(resources.gpu),
        # torchrun's ranks share the job's cores: OpenMP threads per rank, not per job.
        threads_per_rank=lambda w, threads, resources: max(1, threads // max(1, int(resources.gpu))),
    threads: res("train", "threads")
    resources:
        mem_mb=res("train", "mem_mb"),
        runtime=res("train", "runtime"),
        gpu=res("train", "gpu"),
    log:
        f"{LOG_PATTERN}/train_student.log",
    benchmark:
        TRAIN_BENCHMARK
    priority: audit_chain_priority
    conda:
        "../../environment.yml"
    shell:
        "OMP_NUM_THREADS={params.threads_per_rank} {params.launch} train --config {input.config}"
        " --out-dir {params.out_dir} > {log} 2>&1"
