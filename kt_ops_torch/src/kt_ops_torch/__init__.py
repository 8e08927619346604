"""kt-ops-torch: pure-PyTorch backends that run anywhere torch runs.

They are the reference implementations of kt's backend contracts and the fallback on
machines without the native engines.
"""
