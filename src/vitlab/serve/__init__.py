"""`vitlab serve`: an HTTP API and a web page that answer a model's top-k classes and attention rollout.

`model` loads the checkpoint and turns uploads into predictions with the same functions as `vitlab predict`,
`batching` gathers concurrent requests into one forward pass, and `app` is the FastAPI application. Everything
but `model` and `batching` needs the `serve` extra (`pip install 'vitlab[serve]'`).
"""
