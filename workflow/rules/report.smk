# Aggregation and figures read results only; they never train and run on the submitting machine.
localrules: summarize, figures


rule summarize:
    input:
        all_evaluations(),
    output:
        summary=report(RESULTS + "/summary.csv", caption="../report/summary.rst", category="Tables"),
        runs=RESULTS + "/runs.csv",
        histories=RESULTS + "/histories.csv",
    log:
        "logs/" + EXPERIMENT + "/summarize.log",
    shell:
        "python -m feedback_alignment summarize --runs {input} --out $(dirname {output.summary}) > {log} 2>&1"


rule figures:
    input:
        rules.summarize.output,
    output:
        curves=report(RESULTS + "/figures/test_error_curves.png",
                      caption="../report/test_error_curves.rst", category="Figures"),
        final=report(RESULTS + "/figures/final_error.png",
                     caption="../report/final_error.rst", category="Figures"),
    log:
        "logs/" + EXPERIMENT + "/figures.log",
    shell:
        "python -m feedback_alignment figures --results $(dirname {input[0]}) "
        "--out $(dirname {output.curves}) > {log} 2>&1"
