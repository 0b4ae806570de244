"""yuebing decode."""
