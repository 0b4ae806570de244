"""yuebing conductor."""
