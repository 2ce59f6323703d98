"""deltastore's OpenAI-compatible inference server: the continuous-batching engine over one
`DeltaModel` (engine.py), its KV rows and step planner, and the FastAPI app (app.py) in front of it."""
