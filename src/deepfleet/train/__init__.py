"""Runs inside every rank: data -> model -> DeepSpeed engine loop -> checkpoints -> metrics -> save.

Never imports deepfleet.fleet or deepfleet.launch: everything comes from the recipe and the environment.
"""
