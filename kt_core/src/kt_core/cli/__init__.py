"""The `kt` command line."""
