"""Model factories (the offline tiny model) and sequence log-prob computation."""
