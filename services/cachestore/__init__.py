"""yuebing cachestore."""
