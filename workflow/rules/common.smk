# The study this run of Snakemake works on: feedback_alignment.study checks the config and
# answers everything the rules ask (runs, paths, flags); this file only hands it over.
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod

from feedback_alignment.study import ConfigError, Run, Study

# Jobs run `python -m feedback_alignment ...`: in the rules' conda environment with the package
# from this checkout, or else with the interpreter that runs Snakemake (also when it was started
# as .venv/bin/snakemake without activating the environment).
if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
    shell.prefix(f'export PYTHONPATH="{Path(workflow.basedir) / "src"}:$PYTHONPATH"; ')
else:
    shell.prefix(f'export PATH="{Path(sys.executable).parent}:$PATH"; ')

try:
    STUDY = Study(config)
except ConfigError as error:
    raise WorkflowError(str(error)) from None

RESULTS = STUDY.results
DATA_DIR = STUDY.data_dir
RESOURCES = STUDY.resources
EXPERIMENT = STUDY.experiment


def train_flags(wildcards):
    return STUDY.train_flags(wildcards.dataset, wildcards.arch, wildcards.variant)


def prepare_flags(wildcards):
    return STUDY.prepare_flags(wildcards.dataset)


def data_file(wildcards):
    return STUDY.data_file(wildcards.dataset)


def tuning_flags(wildcards):
    return STUDY.train_flags(wildcards.dataset, wildcards.arch, wildcards.variant, wildcards.point)


def tuning_results(wildcards):
    return STUDY.tuning_results(wildcards.dataset, wildcards.arch, wildcards.learning_rule, wildcards.variant)


def selection_file(wildcards):
    if not STUDY.sweep:
        return []
    return STUDY.selection_file(wildcards.dataset, wildcards.arch, wildcards.learning_rule, wildcards.variant)
