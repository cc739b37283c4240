"""SimMIM objective (being written)."""
