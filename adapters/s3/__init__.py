"""Adapter versions in S3 (or any S3-compatible store): URIs, the store, error mapping."""
