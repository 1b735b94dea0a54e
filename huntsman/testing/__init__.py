"""Synthetic frames and star fields of known truth, for tests and benchmarks only.

Kept apart from the science layer (as photutils keeps ``photutils.datasets``): the service
never imports this package, a test checks it.
"""
