"""Audit tools: trace a sample to its source, explain a drop, report a run, re-apply a policy."""
