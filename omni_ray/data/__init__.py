"""Prompt sources: built-in tasks (arith) and, later, HF datasets / jsonl / parquet."""
