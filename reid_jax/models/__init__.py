"""Model code: one file per idea (CLIP towers, position-embedding resize, method heads)."""
