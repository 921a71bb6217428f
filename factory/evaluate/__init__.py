"""Evaluation: metrics, calibration, reports."""
