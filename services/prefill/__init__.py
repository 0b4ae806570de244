"""yuebing prefill."""
