"""Training: the block-diffusion objective (`objective`) and the loop (`loop`)."""
