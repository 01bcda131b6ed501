"""The MoT model (issue 7)."""
