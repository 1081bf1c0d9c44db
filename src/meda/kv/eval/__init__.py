"""Evaluation of compressed caches: seeded synthetic tasks, fidelity to the full cache, the eval harness."""
