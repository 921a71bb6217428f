"""Serve: an OpenAI-compatible endpoint that answers with specialists and escalates to the LLM.

    router.py       routes.json -> which task a request is, and whether its specialist may answer
    centroids.py    per-task embedding centroids, the router's fallback when no signature matches
    specialists.py  one base model in memory with every task's LoRA adapter, switched per request
    requestlog.py   every request in the proxy-call log shape `factory ingest` reads
    app.py          the FastAPI app (/v1/chat/completions, /v1/models, /health, /metrics)
    simulate.py     replay held-out logs through routes.json: share served, quality, savings
"""
