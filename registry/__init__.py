"""The deltastore registry: `registry.server` (the service: SQL index, blob stores, REST API),
`registry.client` (its Python client, cache and credentials; no server dependency) and
`registry.common` (names and error codes both sides share).
"""
