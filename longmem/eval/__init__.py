"""Evaluation: the paper's tasks, recall measures, the demo and the lm-evaluation-harness model."""
