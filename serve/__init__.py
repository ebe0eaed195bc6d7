"""An AUTOMATIC1111-compatible HTTP API over the sdtrt runtime.

``a1111`` is the request/response schema, ``worker`` the engine-facing queue (a ``Service``), ``app`` the thin
FastAPI layer (``create_app(service)``), ``server`` runs it under uvicorn. ``controlnet`` reads the ControlNet
extension's units and ``controlnet_api`` serves its ``/controlnet`` endpoints. fastapi and uvicorn are the
``serve`` extra, imported only inside the functions that need them.
"""
