"""An OpenAI-compatible HTTP server over the serving engine (``memintent serve``): ``app.py`` (the routes),
``protocol.py`` (the request and response bodies), ``loop.py`` (the thread that owns the engine), ``text.py``
(streamed text), ``metrics.py`` (``/metrics``). Needs the ``serve`` extra: ``pip install 'memintent[serve]'``."""
