"""yuebing gateway."""
