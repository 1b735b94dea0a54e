"""The compute pool and the jobs it runs in worker processes."""
