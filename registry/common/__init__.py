"""What the registry's client and server share: names and refs, the error codes of the API's
error body, and the read-ahead stream. Imports neither side."""
