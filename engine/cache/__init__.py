"""The cache pool: results and encoder states, in process (L1) and in Redis (L2)."""
