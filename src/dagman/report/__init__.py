"""Figures (and the HTML report) made from runs and results.

Plots use matplotlib's object API (``matplotlib.figure.Figure``, saved through the Agg canvas): no display,
no ``pyplot`` global state, safe in worker processes and on headless machines. See :mod:`dagman.report.plots`.
"""
