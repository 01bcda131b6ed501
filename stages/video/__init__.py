"""Video stages: probe, shots, clips, crop, quality, keyframes, embed, dedup."""
