"""Analysis of results/: load a run, draw its charts, write its report (``conclab report``; ``conclab demo`` ends with it).

    results   load_run(): every table of results/<run-id>/ as pandas frames (report, notebooks, tests)
    derive    per-experiment frames shared by charts, findings and tables (medians over repeats)
    findings  the sentence under each chart, computed from those frames (analysis.fmt.Finding)
    claims    the claims of the article the lab answers (docs/article.md) vs the numbers; the performance
              targets, met or missed
    charts    one matplotlib figure per chart; style holds the one colour map and the fonts
    tables    the tables under each experiment's charts; html the page's building blocks
    report    report.html for one run; compare: two runs side by side with ratios
    cli       the ``report`` subcommand (add_parser), also ``python -m conclab.analysis``
"""
