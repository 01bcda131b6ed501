"""Stages: the unit users configure, test and scale. See stages/base.py for the contract."""
