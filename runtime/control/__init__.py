"""ControlNet: everything that conditions the UNet on an extra image.

``hint`` turns a user's image into the conditioning tensor a ControlNet takes (alpha handling, the canny
preprocessor, A1111's three resize modes). The control inputs of a pipeline call and their per-step scales are
to live here beside it.
"""
