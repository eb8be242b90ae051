"""Evaluation: retrieval and classification metrics, the evaluation tasks, text towers as embedders, templates."""
