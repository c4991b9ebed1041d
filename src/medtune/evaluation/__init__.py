"""Evaluation: answer extraction (``extract``) and metric definitions (``metrics``)."""
