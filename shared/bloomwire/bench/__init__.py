"""Benchmarks behind `bloomwire bench`; each prints figures, none asserts on time."""
