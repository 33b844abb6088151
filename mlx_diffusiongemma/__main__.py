"""`python -m mlx_diffusiongemma`: the `dgemma` command (as `python -m mlx_lm` runs mlx-lm's)."""

from mlx_diffusiongemma.cli.app import main

if __name__ == "__main__":
    main()
