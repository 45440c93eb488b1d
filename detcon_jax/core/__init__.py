"""What training and evaluation share, below both: the train state and step, the
optimisers, the device mesh, checkpoints, TensorBoard writers and config checks.

Layers (pyproject.toml's import contract, checked by CI): data_pipelines, models ->
objectives -> core -> train / evaluate / export -> sweep / compare -> launch; configs
on top; errors at the bottom.
"""
