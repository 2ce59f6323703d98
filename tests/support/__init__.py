"""What tests and benchmarks share: throwaway registries (SQLite, PostgreSQL, moto S3 and s3rver, a
registry process), small model pairs, delta corpora, fuzzers and load generators."""
