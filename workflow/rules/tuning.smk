# Tuning (a study's `tuning` block): every group (dataset, arch, rule, variant) trains at every
# point of the sweep with the tuning seeds; select_point picks the point of lowest mean
# validation error; the study's runs (train.smk) train at it, or take a tuning run's results
# where seed and settings match. The plan is complete before any tuning run has trained.
TUNING_RUN = STUDY.run_dir(Run("{dataset}", "{arch}", "{learning_rule}", "{variant}", "{seed}", "{point}"))
GROUP = STUDY.group_dir("{dataset}", "{arch}", "{learning_rule}", "{variant}")


use rule train as train_tuning with:
    input:
        data=data_file,
    output:
        result=f"{TUNING_RUN}/result.json",
        history=f"{TUNING_RUN}/history.csv",
    params:
        flags=tuning_flags,
        launcher=STUDY.launcher(),
        device=RESOURCES["device"],
        selected="",
    log:
        f"{TUNING_RUN}/train.log",


localrules: select_point


rule select_point:
    input:
        tuning_results,
    output:
        f"{GROUP}/selected.json",
    log:
        f"{GROUP}/select.log",
    conda:
        "../envs/feedback-alignment.yaml"
    shell:
        "python -m feedback_alignment select --runs {input} --out {output} > {log} 2>&1"
