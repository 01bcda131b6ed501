"""Typed tables: pyarrow schemas and records, one module per table, each versioned."""
