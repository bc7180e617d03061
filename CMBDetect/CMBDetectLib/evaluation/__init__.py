"""Evaluation: the paper's metrics, folder evaluation and reports."""
