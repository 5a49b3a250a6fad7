"""Cluster launchers for scd-train."""
