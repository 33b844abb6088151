"""The network: DiffusionGemma's layers (`layers.py`), the model with its encoder and decoder passes
and the checkpoint key map (`model.py`), its arguments (`args.py`, parsed from already-read
config dicts), the key/value caches (`cache.py`), the vision tower (`vision.py`) and training's
cheap activations (`activations.py`). No file IO: the checkpoint wing reads the files."""
