"""Registrations of kt-ops-cpuinfer: none until the engine's operators are implemented."""
