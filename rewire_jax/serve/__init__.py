"""An OpenAI-compatible server (`rewire-jax serve`): continuous batching on the generation queue,
per-request rewiring options, persistent conversations (docs/serving.md).

  protocol.py       request fields checked, OpenAI-style errors (`ApiError`)
  engine.py         `ServeEngine`: the queue engine in a background thread, fed by the handlers
  conversations.py  `ConversationStore`: deltas / Adam state / history per conversation_id, on disk
  app.py            `create_app(model, ServeConfig)`: the FastAPI routes
  cli.py            `rewire-jax serve`

FastAPI and uvicorn (the `[serve]` extra) are imported by app.py / cli.py's main only.
"""
