"""Evaluation results → human-readable reports."""
