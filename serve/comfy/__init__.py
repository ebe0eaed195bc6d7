"""ComfyUI's protocol on ``sdtrt serve``: its API-format graphs run on sdtrt's pipelines, and its web frontend.

``folders``: the input/output/temp folders files are read from and written to, path-safe.
"""
