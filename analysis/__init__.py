"""Analysis of results/: tables, charts and the HTML report."""
