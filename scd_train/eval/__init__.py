"""Evaluation: video metrics, protocols and probes."""
