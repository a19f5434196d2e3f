"""Model sources the launcher can serve without a hub: the embedded default."""
