"""`moespac serve`: an OpenAI-compatible HTTP server for one MoeSpac, with its experts on show.

FastAPI + uvicorn + pydantic, as llama-cpp-python's server. The layers, bottom up:
`schemas` (the requests, validated), `errors` (OpenAI-shaped error bodies), `activity` (a decode
observer: which experts the model routes to, and how often they were held), `worker` (the one
thread that runs the model: requests in arrival order, a bounded queue, cancellation),
`metrics` (the worker's counters as Prometheus text), `app` (the routes, auth, the chat page).
"""

from __future__ import annotations
