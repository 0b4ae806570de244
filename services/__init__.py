"""yuebing services."""
