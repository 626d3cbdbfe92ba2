# Prepare each dataset once, on the submitting machine (a localrule): the cache is written to a
# temporary name and renamed, so a killed download leaves nothing a later job could mistake for data.
localrules: prepare_data


rule prepare_data:
    output:
        f"{DATA_DIR}/{{dataset}}.pt",
    params:
        flags=prepare_flags,
    log:
        "logs/prepare/{dataset}.log",
    wildcard_constraints:
        dataset="digits|cifar10",
    conda:
        "../envs/feedback-alignment.yaml"
    shell:
        "python -m feedback_alignment prepare --dataset {wildcards.dataset} --out {output} "
        "{params.flags} > {log} 2>&1"


use rule prepare_data as prepare_imagenet with:
    output:
        f"{DATA_DIR}/{{dataset}}.json",
    wildcard_constraints:
        dataset="imagenet",


localrules: prepare_imagenet
