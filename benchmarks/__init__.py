"""Benchmarks of the multimodal-input schemes (see ``compare_schemes``). Not shipped."""
