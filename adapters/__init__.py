"""Everything about adapters: names, validation, registry, stores, engine residency.

Never imports `server`: the training worker and tools use this package without the gateway.
"""
