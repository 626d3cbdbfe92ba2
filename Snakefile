# feedback-alignment: download -> train and evaluate every (dataset x arch x rule x variant x seed)
# -> summary and figures. Run: snakemake --cores all   (config/config.yaml, the digits study)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/tuning.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        f"{RESULTS}/summary.csv",
        rules.figures.output,
    default_target: True
