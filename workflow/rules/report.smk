# Aggregation and figures read results only; they never train and run on the submitting machine.
localrules: summarize, figures


rule summarize:
    input:
        evaluations=STUDY.evaluations(),
        tuning=STUDY.selection_files(),
    output:
        summary=report(f"{RESULTS}/summary.csv", caption="../report/summary.rst", category="Tables"),
        runs=f"{RESULTS}/runs.csv",
        histories=f"{RESULTS}/histories.csv",
        alignment=f"{RESULTS}/alignment.csv",
        references=f"{RESULTS}/references.csv",
        comparisons=report(f"{RESULTS}/comparisons.csv", caption="../report/comparisons.rst", category="Tables"),
        tuning=report(f"{RESULTS}/tuning.csv", caption="../report/tuning.rst", category="Tables"),
        vs_reference=report(f"{RESULTS}/vs_reference.csv", caption="../report/vs_reference.rst",
                            category="Tables"),
    log:
        f"logs/{EXPERIMENT}/summarize.log",
    conda:
        "../envs/feedback-alignment.yaml"
    shell:
        "python -m feedback_alignment summarize --runs {input.evaluations} --tuning {input.tuning} "
        "--out $(dirname {output.summary}) > {log} 2>&1"


rule figures:
    input:
        **rules.summarize.output,
    output:
        curves=report(f"{RESULTS}/figures/test_error_curves.png",
                      caption="../report/test_error_curves.rst", category="Figures"),
        final=report(f"{RESULTS}/figures/final_error.png",
                     caption="../report/final_error.rst", category="Figures"),
        update_angles=report(f"{RESULTS}/figures/update_angles.png",
                             caption="../report/update_angles.rst", category="Figures"),
        feedback=report(f"{RESULTS}/figures/feedback_alignment.png",
                        caption="../report/feedback_alignment.rst", category="Figures"),
        gradient_norms=report(f"{RESULTS}/figures/gradient_norms.png",
                              caption="../report/gradient_norms.rst", category="Figures"),
        sensitivity=report(f"{RESULTS}/figures/sensitivity.png",
                           caption="../report/sensitivity.rst", category="Figures"),
        depth=report(f"{RESULTS}/figures/error_vs_depth.png",
                     caption="../report/error_vs_depth.rst", category="Figures"),
    log:
        f"logs/{EXPERIMENT}/figures.log",
    conda:
        "../envs/feedback-alignment.yaml"
    shell:
        "python -m feedback_alignment figures --results $(dirname {input.summary}) "
        "--out $(dirname {output.curves}) > {log} 2>&1"
