"""The shapes world: a world small enough to train on in minutes, where every answer is known.

A scene is a handful of coloured shapes on a plain background (`scene`), drawn
pixel-exactly (`render`), described in words (`text`: captions, GenEval-style
prompts, VQA, edit instructions, frame-transition captions), turned into training
samples (`samples`), and read back by a deterministic detector (`detect`) that
scores generations, edits and answers (`geneval`). Only numpy and OpenCV: the
trainer and an evaluation script import it without the curation stack.
"""
