"""Generation engine: weights resolution, pipeline build, placement, generate().

Import from the submodules (`engine.engine`, `engine.loader`, `engine.request`): this package
file stays empty so that the HTTP process can use `engine.request` without importing torch.
"""
