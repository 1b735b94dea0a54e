"""Helpers shared by the tests and the benchmarks that are not part of the product."""
