# One job per run; the CLI does the work. Threads reach torch through --threads.
# checkpoint.pt and best.pt are written beside the declared outputs but not declared: Snakemake
# deletes the declared outputs of a failed or preempted job, and the rerun resumes from the
# checkpoint. evaluation.json (the best weights' test errors) comes from the same job: the test
# pass of the best epoch, no second process to load the weights again (python -m
# feedback_alignment evaluate re-measures a run by hand).
RUN = STUDY.run_dir(Run("{dataset}", "{arch}", "{learning_rule}", "{variant}", "{seed}"))


wildcard_constraints:
    learning_rule="[a-z0-9]+",
    variant="[A-Za-z0-9_.]+",
    seed=r"\d+",
    arch="[A-Za-z0-9_.-]+",
    point="[A-Za-z0-9_.=,+-]+",


rule train:
    input:
        data=data_file,
        selection=selection_file,  # the point tuning selected; nothing in a study without tuning
    output:
        result=f"{RUN}/result.json",
        history=f"{RUN}/history.csv",
        evaluation=f"{RUN}/evaluation.json",
    params:
        flags=train_flags,
        launcher=STUDY.launcher(),
        device=RESOURCES["device"],
        selected=lambda wildcards, input: f"--selected {input.selection}" if input.selection else "",
    threads: RESOURCES["threads"]
    resources:
        mem_mb=RESOURCES["mem_mb"],
        runtime=RESOURCES["runtime"],
        gpu=RESOURCES["gpus"],  # snakemake-executor-plugin-slurm asks SLURM for this many
        # The model only with GPUs: the plugin would ask for "--gpus=MODEL:0" otherwise.
        gpu_model=RESOURCES.get("gpu_model", "") if RESOURCES["gpus"] > 0 else "",
        nodes=1,  # torchrun --standalone runs all of a job's processes on one node
    log:
        f"{RUN}/train.log",
    conda:
        "../envs/feedback-alignment.yaml"
    shell:
        "{params.launcher} --dataset {wildcards.dataset} --data {input.data} "
        "--rule {wildcards.learning_rule} --seed {wildcards.seed} {params.flags} {params.selected} "
        "--device {params.device} --out $(dirname {output.result}) > {log} 2>&1"
