"""kt-ops-marlin: GPU int4 (Marlin-format) linear and experts backends.

The backends (KLinearMarlin, KExpertsMarlin) arrive with their issue; an operator is
registered only once it is implemented, so this plugin registers nothing yet.
"""
