"""The OpenAI-compatible HTTP server across the ranks of a torchrun job, with continuous batching.

    command.py    `serve`: the command (launch/serve.py, `llama-mp serve`) on every rank
    app.py        rank 0's HTTP side: FastAPI routes on uvicorn, API key, limits, error JSON
    state.py      what the HTTP side reads: loading, ready, draining or failed, and the scheduler
    protocol.py   OpenAI request validation and the shapes of responses and stream chunks
    scheduler.py  rank 0's bounded queue, slots and batch loop (the model side: runtime/batching.py)

FastAPI and uvicorn come with the `server` extra: pip install -e '.[server]'.
"""
