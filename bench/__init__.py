"""Benchmarks of yuebing, apart from the product code: one module per benchmark and one of shared helpers."""
