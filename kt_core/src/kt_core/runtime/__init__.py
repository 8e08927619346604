"""The runtime: build on meta, plan, inject, load weights, place, generate."""
