"""Leaf utilities (crash-safe writes, hashes, JSON lines): they import neither torch nor the model store."""
