"""``llama4 serve``: an OpenAI-compatible HTTP API with continuous batching, and a web chat page.

``protocol`` (request/response schemas) -> ``inputs`` (requests -> token ids, images, sampling
params) -> ``scheduler`` (one thread owning the engine: admits, prefills in chunks, decodes the
running batch, retires) -> ``outputs`` (events -> OpenAI messages, tool calls, log-probs) ->
``app`` (FastAPI endpoints, streaming, errors, auth, limits, metrics). ``cli`` is the verb;
``static/`` the chat page; ``testing`` the helpers shared by tests and the load benchmark.
"""
