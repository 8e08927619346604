"""A third-party kt plugin, written only against kt-core's public API (used by tests)."""
