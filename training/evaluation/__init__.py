"""Evaluation of a trained Cell2Text model: generate, parse, score against the corpus labels, write the report.

`evaluate` runs the job (`python -m training.evaluation.evaluate`); `metrics`, `text_metrics` and
`ontology_similarity` score; `report` writes report.md, results.json and the plots.
"""
