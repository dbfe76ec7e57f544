"""Benchmarks for the fused log-prob / StableReinforce kernels.

``python -m bench.loss_bench`` compares every loss implementation with the bound set by
the three plain GEMMs of the lm_head (SPEC §6), measured in the same run.
"""
