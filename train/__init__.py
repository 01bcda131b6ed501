"""The trainer (issue 8)."""
