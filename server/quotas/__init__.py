"""Tenants as customers: limits (requests and tokens per minute, concurrency, a cap on
max_tokens), their counters (in process, or shared by every unit in Redis), token-fair
admission weights and usage metering."""
