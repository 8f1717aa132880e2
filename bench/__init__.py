"""Benchmarks of background-sync, run by hand (never by the test suite); see README.md."""
