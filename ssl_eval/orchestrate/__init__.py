"""Orchestration: what runs the stages in order. ``evaluate`` (the evaluation of one backbone
under a collection of protocols, resumable unit by unit, torchrun-aware), ``sweep`` (a grid of
evaluations as submitit jobs) and ``suite`` (the embedded main job: train, evaluate, tables,
report, reference check). Imports every room below it; only commands import it."""
