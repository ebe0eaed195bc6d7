"""ComfyUI's protocol on ``sdtrt serve``: its API-format graphs run on sdtrt's pipelines, and its web frontend.

``folders``: the input/output/temp folders files are read from and written to, path-safe.
``validation`` and ``graph``: the graph interpreter (checking a prompt with ComfyUI's error bodies; running what
its outputs need in dependency order, with ComfyUI's cache between prompts). ``nodes``: the node types a server
runs (``NodeLibrary``, ``/object_info``), declared in ``node`` and written in ``nodes_model``, ``nodes_sampling``,
``nodes_latent``, ``nodes_image``, ``nodes_inpaint`` and ``nodes_control``; ``types``: the values on the links.
"""
