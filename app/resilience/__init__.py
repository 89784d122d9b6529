"""Failure handling shared by the layers above: the circuit breaker and the Redis guard."""
