"""Benchmarks for `harness bench`; each module registers its own with `@register_benchmark`."""
