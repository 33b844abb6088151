"""Checkpoints on disk -> a loaded model: config files (`files.py`, `config.py`), safetensors
(`safetensors.py`: complete, confined, checked against the model), quantization recipes
(`recipes.py`), adapters (`adapters.py`), the tokenizer (`tokenizer.py`) and the loader
(`loading.py`). Only safetensors are read: no pickles, no code from the checkpoint."""
