"""The deltastore registry service: SQL index of deltas per base model, content-addressed blob
storage (local filesystem or S3) and the `/v1` REST API. `registry.client` is the HTTP client.
"""
