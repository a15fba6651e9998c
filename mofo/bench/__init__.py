"""Benchmarks and self-checks: tools that import the product; imported by nothing but the CLI."""
