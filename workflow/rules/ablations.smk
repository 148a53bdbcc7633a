# The less-data curve (students trained on class-balanced fractions of the training set) and the
# loss-component ablation (MixACM recipes that differ only in their loss terms). Both reuse the
# train_student / evaluate_* rules; these targets build just their runs:
#   snakemake --cores all less_data        snakemake --cores all ablation


rule less_data:
    input:
        experiment_files("less_data", "eval_clean_pgd.json"),
        experiment_files("less_data", "eval_autoattack.json"),


rule ablation:
    input:
        experiment_files("ablation", "eval_clean_pgd.json"),
        experiment_files("ablation", "eval_autoattack.json"),
