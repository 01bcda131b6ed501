"""Reasoning-augmented data synthesis: inputs, model steps, renderers, verification, dedup.

The pipeline (`weft.pipelines.synth`) composes these into
ingest -> parse -> input_dedup -> pair_judge -> rollout -> instruct -> reason
-> render -> verify -> dedup, and writes `RUN_DIR/outputs/synth.parquet`.
"""
