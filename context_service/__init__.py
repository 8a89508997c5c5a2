"""Baton's service: the REST API, realtime streams and dashboard over the event log.

``context_service.app.create_app(settings)`` builds the Litestar app (no I/O until it
starts), ``context_service.server.serve(host, port, settings)`` runs it (``baton serve``),
``context_service.keys.create_key(...)`` makes an API key (``baton keys create``). Nothing
is imported here: the CLI imports this package only inside the commands that need it.
"""
