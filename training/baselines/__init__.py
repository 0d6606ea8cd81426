"""Baselines scored on the same test cells as Cell2Text.

`expression`: majority, logistic regression and kNN on log expression. `cell2sentence`: the same LLM and training
budget reading the cell's top genes as symbols (`python -m training.baselines.cell2sentence`).
"""
