# Prepare each dataset once, on the submitting machine (a localrule): the cache is written to a
# temporary name and renamed, so a killed download leaves nothing a later job could mistake for data.
# The flags carry the dataset's kind and options (sources.py); a streamed kind (imagenet) gets a
# manifest of its folder instead of a cache.
localrules: prepare_data


rule prepare_data:
    output:
        f"{DATA_DIR}/{{dataset}}.pt",
    params:
        flags=prepare_flags,
    log:
        "logs/prepare/{dataset}.log",
    wildcard_constraints:
        dataset=STUDY.dataset_pattern(streams=False),
    conda:
        "../envs/feedback-alignment.yaml"
    shell:
        "python -m feedback_alignment prepare --out {output} {params.flags} > {log} 2>&1"


use rule prepare_data as prepare_streamed with:
    output:
        f"{DATA_DIR}/{{dataset}}.json",
    wildcard_constraints:
        dataset=STUDY.dataset_pattern(streams=True),


localrules: prepare_streamed
