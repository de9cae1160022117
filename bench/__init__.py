"""Benchmarks: committed tokens/s through the HTTP API against transformers' own generate."""
