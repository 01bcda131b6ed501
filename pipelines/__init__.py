"""Pipelines: Ray Data plans composing stages."""
