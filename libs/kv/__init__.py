"""KV blocks: keys, codec, sharding, blob limits, layer-wise loads and the cachestore client."""
