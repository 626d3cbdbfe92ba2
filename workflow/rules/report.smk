# Aggregation and figures read results only; they never train and run on the submitting machine.
localrules: summarize, figures


rule summarize:
    input:
        all_evaluations(),
    output:
        summary=report(RESULTS + "/summary.csv", caption="../report/summary.rst", category="Tables"),
        runs=RESULTS + "/runs.csv",
        histories=RESULTS + "/histories.csv",
        alignment=RESULTS + "/alignment.csv",
        references=RESULTS + "/references.csv",
        vs_reference=report(RESULTS + "/vs_reference.csv", caption="../report/vs_reference.rst",
                            category="Tables"),
    log:
        "logs/" + EXPERIMENT + "/summarize.log",
    shell:
        "python -m feedback_alignment summarize --runs {input} --out $(dirname {output.summary}) > {log} 2>&1"


rule figures:
    input:
        **rules.summarize.output,
    output:
        curves=report(RESULTS + "/figures/test_error_curves.png",
                      caption="../report/test_error_curves.rst", category="Figures"),
        final=report(RESULTS + "/figures/final_error.png",
                     caption="../report/final_error.rst", category="Figures"),
        update_angles=report(RESULTS + "/figures/update_angles.png",
                             caption="../report/update_angles.rst", category="Figures"),
        feedback=report(RESULTS + "/figures/feedback_alignment.png",
                        caption="../report/feedback_alignment.rst", category="Figures"),
        gradient_norms=report(RESULTS + "/figures/gradient_norms.png",
                              caption="../report/gradient_norms.rst", category="Figures"),
        depth=report(RESULTS + "/figures/error_vs_depth.png",
                     caption="../report/error_vs_depth.rst", category="Figures"),
    log:
        "logs/" + EXPERIMENT + "/figures.log",
    shell:
        "python -m feedback_alignment figures --results $(dirname {input.summary}) "
        "--out $(dirname {output.curves}) > {log} 2>&1"
