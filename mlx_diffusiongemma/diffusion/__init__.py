"""Block diffusion: the options (`options.py`), the sampler's math (`sampler.py`, `topk.py`), the
canvas position states (`canvas.py`), the noise (`noise.py`), the one block loop (`block.py`)
with its two denoisers (`exact.py`, `fast.py`), the generation loop (`engine.py`) and what it
yields (`events.py`)."""
