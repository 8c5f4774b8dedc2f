"""HF integration (filled in by the reflective-model work)."""
