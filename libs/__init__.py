"""yuebing libs."""
