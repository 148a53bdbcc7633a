# The less-data curve (students trained on class-balanced fractions of the training set) and the
# loss-component ablation (MixACM recipes that differ only in their loss terms). Both reuse the
# train_student / evaluate_* rules; these targets build just their runs:
#   snakemake --cores all less_data
#   snakemake --cores all ablation
# The robustness-transfer comparison (every student of the same teacher, the teacher and AT)
# likewise:
#   snakemake --cores all transfer


rule less_data:
    input:
        experiment_results("less_data"),


rule ablation:
    input:
        experiment_results("ablation"),


rule transfer:
    input:
        experiment_results("transfer"),
