"""Model and dataset card templates for the Hub, filled from real evaluation results."""

from .render import render_dataset_card, render_model_card

__all__ = ["render_dataset_card", "render_model_card"]
