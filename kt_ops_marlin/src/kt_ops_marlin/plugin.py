"""Registrations of kt-ops-marlin: none until the int4 backends are implemented."""
