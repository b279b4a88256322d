"""The experiments harness: ``conclab run EXPERIMENT`` measures every backend and writes tidy tables.

One run = one directory results/<run-id>/ with manifest.json and one CSV per
table (experiments.harness.tables.COLUMNS; docs/experiments.md). Each backend
runs as a pinned subprocess, driven by the load generator (a subprocess too,
through the adapter experiments.harness.loadproc) on the other CPUs, and
sampled from /proc.

What the experiments are (names, order, tables, charts, what each needs from
another) is declared once, in experiments.registry.
"""
