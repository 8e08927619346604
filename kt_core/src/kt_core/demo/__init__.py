"""`kt demo`: the whole flow on a tiny built-in model that needs no download."""
