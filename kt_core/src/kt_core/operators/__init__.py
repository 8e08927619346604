"""kt-core's own operators: the wrappers that dispatch to registered backends."""
