"""Benchmarks: accuracy baselines, training throughput, serving load, GPU check."""
