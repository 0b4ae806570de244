"""The engine: model loading, sampling, the runner, KV memory, the simulated engine and cost profiles."""
