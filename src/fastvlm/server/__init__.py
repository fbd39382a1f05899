"""The OpenAI-compatible HTTP server (``fastvlm serve``); needs the ``server`` extra.

``app.create_app(engine, ...)`` builds the FastAPI app; ``cli`` runs it under uvicorn.
Nothing is imported here, so ``import fastvlm`` never needs fastapi.
"""
