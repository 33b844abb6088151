"""The canvas powers: templates with holes (`template.py`), filled on the canvas (`infill.py`), JSON
that always parses (`schema.py`), edits (`edit.py`), the one-pass structured read (`score.py`) and
the 4x4 Sudoku solved with its givens pinned (`sudoku.py`)."""
