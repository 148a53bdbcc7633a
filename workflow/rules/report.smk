# Tables, figures and the HTML report, built from the result files alone (mixacm.report). Each
# table gets every result of its experiment plus the files that trace its cost: the training
# summary and the train_student benchmark beside each result.

localrules:
    render_table,
    render_figures,
    render_report,


rule render_table:
    input:
        unpack(lambda w: table_inputs(w.table)),
    output:
        "results/table_{table}.csv",
    wildcard_constraints:
        table="|".join(TABLE_NAMES),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=0,
    log:
        "logs/report/table_{table}.log",
    benchmark:
        "results/benchmarks/render_table_{table}.tsv"
    conda:
        "../../environment.yml"
    shell:
        "mixacm table --table {wildcards.table} --results {input.results:q}"
        " --costs {input.costs:q} --out {output}"
        " > {log} 2>&1"


rule render_figures:
    input:
        tables=TABLES,
    output:
        FIGURES,
    params:
        out_dir=lambda w, output: Path(output[0]).parent,
        config=CONFIG_FILE,
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=0,
    log:
        "logs/report/figures.log",
    benchmark:
        "results/benchmarks/render_figures.tsv"
    conda:
        "../../environment.yml"
    shell:
        "mixacm figures --tables {input.tables:q} --config {params.config:q} --out-dir {params.out_dir}"
        " > {log} 2>&1"


rule render_report:
    input:
        tables=TABLES,
        figures=FIGURES + (["results/figures/eps_sweep.png"] if AUDIT_RESULTS else []),
        results=lambda w: all_of("results"),
        costs=lambda w: all_of("costs"),
        teachers=lambda w: report_teachers(),
    output:
        "report/paper_tables.html",
    params:
        config=CONFIG_FILE,
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=0,
    log:
        "logs/report/report.log",
    benchmark:
        "results/benchmarks/render_report.tsv"
    conda:
        "../../environment.yml"
    shell:
        "mixacm report --tables {input.tables:q} --figures {input.figures:q}"
        " --results {input.results:q} --costs {input.costs:q} --teachers {input.teachers:q}"
        " --config {params.config:q}"
        " --out {output} > {log} 2>&1"
